"""``parts: auto`` in training: one split for every rank."""
from __future__ import annotations

import os
import sys

from pipellm.config import TrainConfig
from pipellm.errors import PipellmError
from pipellm.models.base import ModelFamily
from pipellm.pipeline.partition import Partition, PipelineLayers
from pipellm.plan import plan_run
from pipellm.plan.profile import device_memory_bytes, local_device


def agreed_auto_parts(cfg: TrainConfig, hf_config, family: ModelFamily, resume=None) -> list[int]:
    """``parts: auto`` in training, after the process group exists: rank 0 profiles on its device, prints the
    plan and sends its parts to every rank (each rank measuring for itself could pick a different split from
    timing noise, and stages that disagree on their layers train a wrong model). When nothing fits, every rank
    raises the same ``PipellmError``.

    A run resuming its optimizer state (``resume``, a ``pipellm.training.checkpointer.ResumePoint``) on the same process
    grid keeps the checkpoint's split instead: a new measurement may differ, and on the same split the run
    continues bit-exactly (on another grid the state follows whatever split is planned).
    """
    import deepspeed.comm as dist

    topology = cfg.model_topo.process_topology
    if resume is not None and not resume.weights_only:
        layout = resume.state["layout"]
        if layout["axes"] == topology.axes and layout["dims"] == topology.dims:
            parts = Partition.of_boundaries(PipelineLayers.of(family, hf_config), layout["stage_boundaries"]).parts
            if dist.get_rank() == 0:
                print(f"pipellm: parts: auto keeps the split of the checkpoint it resumes: {parts}", file=sys.stderr)
            return parts
    message: list = [None]
    if dist.get_rank() == 0:
        device = local_device()
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        try:
            plan, text = plan_run(cfg, hf_config, family, device, device_memory_bytes(device, processes),
                                  cfg.pipe_degree, "auto", must_fit=True)
            print(text, file=sys.stderr, flush=True)
            message = [plan.parts]
        except PipellmError as err:
            message = [str(err)]
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], str):
        raise PipellmError(message[0])
    return message[0]
