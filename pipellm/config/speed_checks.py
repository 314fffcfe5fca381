"""The ``speed`` section's checks against the other keys: part of ``pipellm.config.checks``' one pass
(``SECTION_CHECKS``), in a module of their own to keep that one under the size limit. Whether liger can run on
this machine is ``pipellm.models.kernels.check_liger_environment``'s, as it needs the environment.
"""
from __future__ import annotations

from pipellm.config.schema import TrainConfig
from pipellm.errors import PipellmError


def liger_levers(speed) -> list[str]:
    """The keys of ``speed`` (``pipellm.config.schema.Speed``) that turn a liger-kernel lever on."""
    return [key for key, on in (("speed.liger_kernels", speed.liger_kernels),
                                ("speed.loss_kernel: liger", speed.loss_kernel == "liger")) if on]


def check_speed(cfg: TrainConfig, source: str) -> None:
    """One line naming the keys when a ``speed`` lever conflicts with another key."""
    speed, liger_keys = cfg.speed, liger_levers(cfg.speed)
    if liger_keys and cfg.pipeline_schedule == "zb-h1":
        # ZB-H1 runs a fused kernel's backward twice (B, then W); liger's rotary writes its incoming gradient in
        # place, so the second run would read a changed one.
        raise PipellmError(f"{source}: `{liger_keys[0]}` with `pipeline_schedule: zb-h1` is not supported (liger's "
                           f"backward kernels may overwrite their incoming gradient, which ZB-H1 uses twice); "
                           f"turn it off or use `pipeline_schedule: 1f1b`")
    if speed.loss_kernel != "torch" and cfg.loss_chunk_tokens is not None:
        raise PipellmError(f"{source}: `speed.loss_kernel: {speed.loss_kernel}` and `loss_chunk_tokens` are two "
                           f"ways to compute the loss: set `loss_chunk_tokens: null` or `speed.loss_kernel: torch`")
    if speed.loss_kernel != "torch" and cfg.objective != "token_mean":
        raise PipellmError(f"{source}: `speed.loss_kernel: {speed.loss_kernel}` serves `objective: token_mean` "
                           f"only (this config has `{cfg.objective}`, which computes its own loss); use `torch`")
