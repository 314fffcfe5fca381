"""The DPO objective (``objective: dpo``): a pair's answers scored by their summed token log-probs against the
reference model's, which travel with the labels (``pipellm.training.reference`` computes them once).

**Labels** of a micro batch (``PairLabels``, built by ``pipellm.training.reference.PairBatches``): the shifted
targets; the loss scale ``gradient_accumulation_steps * D / (pairs in the global batch)``; per target token the
slot of its sample in the micro batch (-1: no target), slots ``2j`` / ``2j + 1`` being pair j's chosen and
rejected answer; the reference log-prob of each slot; and the global sample id of each slot (which the reference
pass records its log-probs under). DeepSpeed's mean over micro batches and replicas of the scaled sums is then the
mean over the global batch's pairs, as ``token_mean_loss`` does for tokens.

**Losses** (``dpo.loss``), with ``z = beta * ((pi_c - pi_r) - (ref_c - ref_r))`` per pair (``pi``: the policy's
summed answer log-probs): ``sigmoid`` ``-(1 - eps) log s(z) - eps log s(-z)`` (DPO; ``eps`` =
``label_smoothing``), ``ipo`` ``(z / beta - 1 / (2 beta))^2``, ``hinge`` ``relu(1 - z)``, as TRL defines them.

**Figures** (TRL's names): ``rewards/chosen`` ``beta (pi_c - ref_c)``, ``rewards/rejected``,
``rewards/accuracies`` (share of pairs whose chosen reward is higher), ``rewards/margins``, ``logps/chosen``,
``logps/rejected``: means over the pairs scored since the last ``figures`` call of that split (eval: ``eval_``
prefix), reduced over all ranks (``figures`` runs on every rank at the same point of the loop).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipellm.config.schema import DPO as DPOConfig
from pipellm.pipeline.chunked_loss import chunked_linear_token_losses
from pipellm.pipeline.loss import HeadOutput, logits_cross_entropy


class PairLabels(NamedTuple):
    """A micro batch's labels under a pairwise objective (see the module docstring)."""

    targets: torch.Tensor
    """``(batch, seq)`` next-token targets, -100 where untrained."""
    loss_scale: torch.Tensor
    """``(1,)``: ``gradient_accumulation_steps * D / (pairs in the global batch)``."""
    slots: torch.Tensor
    """``(batch, seq)`` int64: the slot of the sample the target belongs to, -1 where there is no target."""
    reference: torch.Tensor
    """``(slots,)`` float32: the reference model's summed answer log-prob of each slot."""
    sample_ids: torch.Tensor
    """``(slots,)`` int64: each slot's sample id in its store (the reference pass records under it)."""
    last_tokens: torch.Tensor
    """``(slots,)`` int64: the flat index (``row * seq + position``) of each slot's last token (a reward model
    scores it: ``pipellm.pipeline.reward``)."""
    margins: torch.Tensor
    """``(slots,)`` float32: each slot's record ``margin`` (NaN: none given; the reward model's)."""


def token_logps(output: HeadOutput, targets: torch.Tensor, chunk_tokens: int | None) -> torch.Tensor:
    """Each target token's log-prob under the model, fp32, ``(batch * seq,)``, 0 where untrained."""
    if output.logits is not None:
        return -logits_cross_entropy(output.logits, targets, reduction="none")
    hidden = output.hidden
    return -chunked_linear_token_losses(hidden.reshape(-1, hidden.shape[-1]), output.weight, targets.reshape(-1),
                                        chunk_tokens)


def answer_logps(per_token: torch.Tensor, slots: torch.Tensor, n_slots: int) -> torch.Tensor:
    """The per-slot sums of ``per_token`` (tokens without a slot dropped), fp32 ``(n_slots,)``."""
    flat = slots.reshape(-1)
    index = torch.where(flat < 0, n_slots, flat)
    sums = torch.zeros(n_slots + 1, dtype=torch.float32, device=per_token.device)
    return sums.index_add(0, index, per_token)[:n_slots]


def _sigmoid(z, beta, smoothing):
    return -F.logsigmoid(z) * (1 - smoothing) - F.logsigmoid(-z) * smoothing


def _ipo(z, beta, smoothing):
    return (z / beta - 1 / (2 * beta)) ** 2


def _hinge(z, beta, smoothing):
    return torch.relu(1 - z)


DPO_LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo, "hinge": _hinge}
"""Per-pair loss of ``z = beta * (policy log-ratio - reference log-ratio)``, by ``dpo.loss``."""

FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


class PairStats:
    """Running sums of the per-pair figures since the last ``take``, one set per split (kept on the device)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, split: str, values: list[torch.Tensor]) -> None:
        row = torch.stack([v.detach().double().sum() for v in values] + [
            torch.tensor(float(len(values[0])), dtype=torch.float64, device=values[0].device)])
        self.sums[split] = self.sums[split] + row if split in self.sums else row

    def take(self, split: str) -> dict[str, float]:
        """The means over every rank's pairs (all ranks call it together), then reset."""
        from pipellm.training.distributed import all_reduce

        mine = self.sums.pop(split, None)
        mine = torch.zeros(len(self.names) + 1, dtype=torch.float64) if mine is None else mine.cpu()
        total = all_reduce(mine)
        count = float(total[-1])
        if not count:
            return {}
        prefix = "eval_" if split == "eval" else ""
        return {prefix + name: float(total[i]) / count for i, name in enumerate(self.names)}


class PairwiseObjective:
    """What DPO and the reward model share: the labels' shape, the reference-pass hook and the figures."""

    pairwise = True
    """Trains on preference pairs (``pipellm.data.preference``); the trainer attaches ``PairLabels``."""
    uses_reference = True
    """The trainer computes the reference log-probs before the first step (``pipellm.training.reference``), and
    compiled layers round as eager so that pass and the training steps agree (``pipellm.pipeline.stages``)."""

    def __init__(self, names: tuple[str, ...]):
        self.stats = PairStats(names)
        self._sink: dict | None = None

    @contextlib.contextmanager
    def recording(self, sink: dict):
        """While open, ``loss`` records each slot's summed log-prob into ``sink[sample_id]`` (the reference pass)
        and returns 0."""
        self._sink = sink
        try:
            yield sink
        finally:
            self._sink = None

    def figures(self, loss: float, split: str) -> dict[str, float]:
        return self.stats.take(split)

    def _record(self, values: torch.Tensor, labels: PairLabels) -> torch.Tensor:
        for sample, value in zip(labels.sample_ids.tolist(), values.detach().float().cpu().tolist()):
            self._sink[sample] = value
        return values.sum() * 0.0


class DPO(PairwiseObjective):
    """``objective: dpo`` (see the module docstring)."""

    def __init__(self, settings: DPOConfig, chunk_tokens: int | None = None):
        super().__init__(FIGURES)
        self.settings, self.chunk_tokens = settings, chunk_tokens

    @classmethod
    def from_config(cls, cfg) -> "DPO":
        return cls(cfg.dpo, cfg.loss_chunk_tokens)

    def policy_logps(self, output: HeadOutput, labels: PairLabels) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot's summed answer log-prob, and each token's log-prob (0 where untrained)."""
        per_token = token_logps(output, labels.targets, self.chunk_tokens)
        return answer_logps(per_token, labels.slots, len(labels.reference)), per_token

    def loss(self, output: HeadOutput, labels) -> torch.Tensor:
        labels = PairLabels(*labels)
        logps, per_token = self.policy_logps(output, labels)
        if self._sink is not None:
            return self._record(logps, labels)
        beta, reference = self.settings.beta, labels.reference.float()
        chosen, rejected = logps[0::2], logps[1::2]
        chosen_ratio, rejected_ratio = chosen - reference[0::2], rejected - reference[1::2]
        z = beta * (chosen_ratio - rejected_ratio)
        losses = DPO_LOSSES[self.settings.loss](z, beta, self.settings.label_smoothing)
        # A micro batch of filler rows has no pair: 0, still part of the graph for the backward.
        loss = losses.sum() * labels.loss_scale.float().reshape(()) + per_token.sum() * 0.0
        rewards_chosen, rewards_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        self.stats.add("train" if torch.is_grad_enabled() else "eval",
                       [rewards_chosen, rewards_rejected, (rewards_chosen > rewards_rejected).double(),
                        rewards_chosen - rewards_rejected, chosen.detach(), rejected.detach()])
        return loss if output.aux is None else loss + output.aux
