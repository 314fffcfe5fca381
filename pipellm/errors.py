"""The one error type users see: its message names the file, line or config key at fault and the fix."""


class PipellmError(Exception):
    """A user error: the message names the file/line/key and the fix. Entry points print it on one line."""
