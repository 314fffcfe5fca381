"""Records → templates → token ids and label masks → cached, packed, sharded batches."""

IGNORE_INDEX = -100
"""The label of a position that carries no loss (prompt, padding, the first token of a sample): cross entropy's
``ignore_index``."""
