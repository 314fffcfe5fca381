"""``loss_chunk_tokens``: the chunked projection + cross entropy against the whole-batch one, on the same rows.

Every family's equivalence test also runs its pipeline with chunks (``equivalence.run_pipeline_both_losses``)
against transformers; here the function itself: uneven chunks, ignored tokens, a weight computed from a
parameter, and gradients that reach only the inputs that ask for them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipellm.pipeline.chunked_loss import chunked_linear_cross_entropy

TOKENS, HIDDEN, VOCAB = 23, 16, 50


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    raw = torch.randn(VOCAB, HIDDEN, generator=generator)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    targets[::4] = -100  # prompt and padding positions
    return hidden, raw, targets


@pytest.mark.parametrize("chunk", [1, 5, 23, 64])
def test_loss_and_gradients_equal_the_whole_batch(chunk):
    hidden, raw, targets = inputs()
    runs = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), raw.clone().requires_grad_()
        weight = F.normalize(w, dim=-1)  # computed from the parameter, as baichuan2's head: autograd goes through
        if chunked:
            loss = chunked_linear_cross_entropy(h, weight, targets, chunk)
        else:
            loss = F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100, reduction="sum")
        (loss * 0.37).backward()  # a loss scale, as the pipeline applies
        runs.append((loss.detach(), h.grad, w.grad))
    (whole_loss, whole_h, whole_w), (loss, grad_h, grad_w) = runs
    assert loss.dtype == torch.float32 and loss.shape == ()
    # fp32 sums in another order: equal up to rounding.
    torch.testing.assert_close(loss, whole_loss)
    torch.testing.assert_close(grad_h, whole_h)
    torch.testing.assert_close(grad_w, whole_w)
    assert not grad_h[::4].any()  # ignored tokens contribute nothing


def test_gradient_only_where_asked():
    hidden, raw, targets = inputs(1)
    frozen_weight = raw.clone()
    h = hidden.clone().requires_grad_()
    chunked_linear_cross_entropy(h, frozen_weight, targets, 4).backward()
    assert h.grad is not None and frozen_weight.grad is None
    w = raw.clone().requires_grad_()
    chunked_linear_cross_entropy(hidden, w, targets, 4).backward()
    assert w.grad is not None and w.grad.dtype == w.dtype


def test_all_tokens_ignored_gives_zero_loss_and_gradients():
    hidden, raw, targets = inputs(2)
    h, w = hidden.clone().requires_grad_(), raw.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, torch.full_like(targets, -100), 6)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_evaluation_without_autograd_gives_the_same_loss():
    # engine.eval_batch runs the loss under no_grad.
    hidden, raw, targets = inputs(3)
    whole = F.cross_entropy(F.linear(hidden, raw), targets, ignore_index=-100, reduction="sum")
    with torch.no_grad():
        chunked = chunked_linear_cross_entropy(hidden, raw, targets, 7)
    torch.testing.assert_close(chunked, whole)
