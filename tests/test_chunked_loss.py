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


@pytest.mark.parametrize("model", ["tiny_pp_model", "tied_pp_model"])
def test_bf16_training_with_the_loss_in_chunks_equals_training_on_whole_logits(tmp_path, model, request):
    """``train_ds.py`` on 2 stages in bf16 (DeepSpeed's bf16 optimizer), with and without ``loss_chunk_tokens``:
    with one chunk per micro batch the two compute the same numbers, so every step's loss and gradient norm are
    equal. The head's weight reaches the loss as a stage output; when it was the parameter itself, DeepSpeed's
    backward prologue (run by the hook on the first stage output to get its gradient) cleared the head's freshly
    accumulated bf16 gradient, and the head never trained (gradient norm 17% low, step 1's loss unchanged)."""
    from equivalence import spawn_training, two_stage_config

    model_path = request.getfixturevalue(model)
    model_path = model_path[1] if isinstance(model_path, tuple) else model_path
    runs = []
    for chunk in (None, 4 * 64):  # micro batches of 4 rows of 64 tokens: one chunk each
        work = tmp_path / f"chunk{chunk}"
        work.mkdir()
        config = dict(two_stage_config(work, model_path, "uniform", n_epochs=1, save_steps=0), max_steps=3,
                      save_final=False, use_tensorboard=False, bf16={"enabled": True}, loss_chunk_tokens=chunk)
        runs.append([(r["loss"], r["grad_norm"]) for r in spawn_training(config, work / "config.yml")])
    assert len(runs[0]) == 3 and runs[0] == runs[1]
