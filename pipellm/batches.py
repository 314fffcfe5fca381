"""From tokenized rows to the micro batches a pipeline step consumes.

Every rank can compute every global batch (the sample order depends only on the seed and the epoch), which is
what lets each data-parallel replica know the number of labelled tokens in the whole global batch without a
collective: the loss is normalised by it (see ``pipellm.pipeline.token_mean_loss``).
"""
from __future__ import annotations

import torch


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t is trained to predict token t + 1, the last position nothing."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


class GlobalBatchOrder:
    """Which rows form global batch ``step``: a fresh seeded permutation per epoch, the tail that does not
    fill a global batch skipped (it rotates through the next epochs' permutations)."""

    def __init__(self, num_rows: int, global_batch_size: int, seed: int):
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_rows // global_batch_size
        self._epoch, self._permutation = None, None

    def rows(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.num_rows, generator=generator)
        return self._permutation[index * self.global_batch_size:(index + 1) * self.global_batch_size]

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch


def micro_batches(input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int, data_rank: int,
                  data_degree: int) -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """This replica's micro batches of one global batch, as ``((input_ids, position_ids), (targets, loss_scale))``.

    ``input_ids``/``labels`` are the global batch's rows (unshifted labels, -100 where untrained). Replica r
    takes the r-th contiguous block of rows.
    """
    global_rows = input_ids.shape[0]
    rows_per_replica = global_rows // data_degree
    accumulation_steps = rows_per_replica // micro_batch_size
    targets = shift_targets(labels)
    labelled = int((targets != -100).sum())
    # Scale so that DeepSpeed's mean over micro batches and replicas becomes a mean over labelled tokens.
    loss_scale = torch.tensor([accumulation_steps * data_degree / max(labelled, 1)], dtype=torch.float32)
    start = data_rank * rows_per_replica
    position_ids = torch.arange(input_ids.shape[1]).expand(micro_batch_size, -1).contiguous()
    batches = []
    for offset in range(start, start + rows_per_replica, micro_batch_size):
        rows = slice(offset, offset + micro_batch_size)
        batches.append(((input_ids[rows].contiguous(), position_ids), (targets[rows].contiguous(), loss_scale)))
    return batches
