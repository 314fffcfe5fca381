"""What the last stage hands its loss (``HeadOutput``), what scores it (an ``Objective``), and the default
objective (``token_mean``): cross entropy over a micro batch's labelled tokens, scaled for the global batch.

An objective is any object with ``loss`` and ``figures`` (``Objective``); both engines call the same one: the
pipeline as DeepSpeed's ``loss_fn`` on the last stage, the ZeRO-3 baseline on the logits of the transformers
model. ``pipellm.training.objective`` picks it from the config's ``objective`` key.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from pipellm.data import IGNORE_INDEX
from pipellm.observe.metrics import perplexity
from pipellm.pipeline.chunked_loss import chunked_linear_cross_entropy, liger_linear_cross_entropy

Labels = tuple[torch.Tensor, torch.Tensor]
"""``(targets, loss_scale)`` of a micro batch, as ``pipellm.data.batches.micro_batches`` makes them."""


class HeadOutput(NamedTuple):
    """What the output head returns: the logits, or (with ``loss_chunk_tokens``) the final hidden states and the
    projection weight for the loss to project a chunk at a time; and the family's auxiliary loss term, if any.
    Only tensors (or None) travel: DeepSpeed hands the last stage's output to the loss function as it is."""

    logits: torch.Tensor | None = None
    """``(batch, seq, vocab)``; None when the projection is deferred to the loss."""
    hidden: torch.Tensor | None = None
    """``(batch, seq, hidden)`` after the final norm, when the projection is deferred."""
    weight: torch.Tensor | None = None
    """``(vocab, hidden)``, the projection the loss applies to ``hidden``."""
    aux: torch.Tensor | None = None
    """The family's auxiliary loss on this micro batch, coefficient included (mixtral's router balance)."""


class Objective(Protocol):
    """What training minimises. ``pipellm.training.objective`` builds it from the config on every rank."""

    def loss(self, output: HeadOutput, labels: Labels) -> torch.Tensor:
        """A micro batch's loss, scaled so that the engines' mean over micro batches and replicas is the
        objective of the global batch (see ``token_mean_loss`` for the scale)."""

    def figures(self, loss: float, split: str) -> dict[str, float]:
        """Figures the metrics record adds for the mean ``loss`` of a step (``split`` ``"train"``, logged as
        ``loss``) or of an eval (``"eval"``, logged as ``eval_loss``). Every rank calls it at the same point, so it
        may all-reduce what ``loss`` gathered on the last stage since its previous call for that split (DPO's
        rewards: ``pipellm.pipeline.preference``)."""


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross entropy summed over the labelled tokens (``reduction`` ``none``: each token's, 0 where not labelled),
    in fp32 (on an fp32 copy of the logits)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


@functools.cache
def compiled_cross_entropy():
    """``logits_cross_entropy`` compiled (``speed.loss_kernel: compiled``): inductor fuses the fp32 upcast into the
    softmax reductions and their backward, so no fp32 copy of the logits (tokens x vocab x 4 bytes) is written or
    read back. The same function; reductions may round differently (``tests/test_speed.py``)."""
    return torch.compile(logits_cross_entropy, dynamic=False)


def token_mean_loss(outputs: HeadOutput, labels: Labels, chunk_tokens: int | None = None,
                    kernel: str = "torch") -> torch.Tensor:
    """Cross entropy summed over a micro batch's labelled tokens, times ``loss_scale`` (plus ``outputs.aux``).

    The training loop sets ``loss_scale = gradient_accumulation_steps * D / (labelled tokens in the global
    batch)``. DeepSpeed divides each micro batch's loss by the accumulation steps and averages gradients and
    losses over the D replicas, so the step's loss and gradient are those of the mean over every labelled token
    of the global batch: a long sample weighs by its tokens, not by its micro batch.

    ``aux`` is added unscaled, so the same division and averaging make the step's auxiliary term the mean of
    ``aux`` over the global batch's micro batches (all replicas). With one micro batch that is the term on the
    global batch; with several it is the reference's term only if the term is linear in the tokens, which
    mixtral's load-balancing loss is not (see ``pipellm.models.mixtral``). Without logits, ``hidden`` is
    projected and scored ``chunk_tokens`` tokens at a time (``pipellm.pipeline.chunked_loss``), or by liger's
    fused linear + cross entropy with ``kernel`` ``liger``; ``kernel`` ``compiled`` compiles the logits' loss
    (``pipellm.config.schema.Speed.loss_kernel``).
    """
    targets, loss_scale = labels
    if outputs.logits is not None:
        cross_entropy = compiled_cross_entropy() if kernel == "compiled" else logits_cross_entropy
        losses = cross_entropy(outputs.logits, targets)
    else:
        hidden = outputs.hidden.reshape(-1, outputs.hidden.shape[-1])
        if kernel == "liger":
            losses = liger_linear_cross_entropy(hidden, outputs.weight, targets.view(-1))
        else:
            losses = chunked_linear_cross_entropy(hidden, outputs.weight, targets.view(-1), chunk_tokens)
    loss = losses * loss_scale.to(losses.dtype).reshape(())
    return loss if outputs.aux is None else loss + outputs.aux


@dataclasses.dataclass(frozen=True)
class TokenMeanCrossEntropy:
    """``objective: token_mean`` (the default): ``token_mean_loss``; evals also log the perplexity."""

    chunk_tokens: int | None = None
    """``loss_chunk_tokens``: the size of the chunks a deferred projection is scored in."""
    kernel: str = "torch"
    """``speed.loss_kernel``: ``torch``, ``compiled`` or ``liger`` (see ``token_mean_loss``)."""

    @classmethod
    def from_config(cls, cfg) -> "TokenMeanCrossEntropy":
        return cls(cfg.loss_chunk_tokens, cfg.speed.loss_kernel)

    def loss(self, output: HeadOutput, labels: Labels) -> torch.Tensor:
        return token_mean_loss(output, labels, self.chunk_tokens, self.kernel)

    def figures(self, loss: float, split: str) -> dict[str, float]:
        return {"eval_ppl": perplexity(loss)} if split == "eval" else {}
