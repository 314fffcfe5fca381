"""The last stage's loss: cross entropy over a micro batch's labelled tokens, scaled for the global batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipellm.pipeline.chunked_loss import chunked_linear_cross_entropy


def token_mean_loss(outputs, labels: tuple[torch.Tensor, torch.Tensor], chunk_tokens: int | None = None
                    ) -> torch.Tensor:
    """Cross entropy summed over a micro batch's labelled tokens, times ``loss_scale`` (plus an auxiliary term).

    The training loop sets ``loss_scale = gradient_accumulation_steps * D / (labelled tokens in the global
    batch)``. DeepSpeed divides each micro batch's loss by the accumulation steps and averages gradients and
    losses over the D replicas, so the step's loss and gradient are those of the mean over every labelled token
    of the global batch: a long sample weighs by its tokens, not by its micro batch.

    ``outputs`` is the logits, or ``(logits, aux)`` for a family with an auxiliary loss, ``aux`` being that loss
    (coefficient included) on this micro batch alone. ``aux`` is added unscaled, so the same division and averaging
    make the step's auxiliary term the mean of ``aux`` over the global batch's micro batches (all replicas).
    With one micro batch that is the term on the global batch; with several it is the reference's term only if
    the term is linear in the tokens, which mixtral's load-balancing loss is not (see ``pipellm.models.mixtral``).
    With ``chunk_tokens``, ``outputs`` is ``(hidden, weight[, aux])``, projected and scored that many tokens at a
    time (``pipellm.pipeline.chunked_loss``).
    """
    targets, loss_scale = labels
    if chunk_tokens is None:
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        losses = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100,
                                 reduction="sum")
    else:
        hidden, weight, *extra = outputs
        aux = extra[0] if extra else None
        losses = chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.view(-1),
                                              chunk_tokens)
    loss = losses * loss_scale.to(losses.dtype).reshape(())
    return loss if aux is None else loss + aux
