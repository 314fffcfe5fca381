"""The ``speed`` levers that run on CUDA only, against the torch path they replace (skipped without a GPU; liger's
need liger-kernel installed). In fp32 every lever equals the torch path to fp32 rounding; in bf16 each is at least
about as accurate as the torch path, both measured against the same computation in fp64.

    python -m pytest -q tests/test_speed_gpu.py     # on a GPU machine with liger-kernel
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from pipellm.models import kernels
from pipellm.models.attention import AttentionOptions, causal_attention
from pipellm.pipeline.chunked_loss import chunked_linear_cross_entropy, liger_linear_cross_entropy

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LIGER = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.liger_available()),
                           reason="needs a CUDA device and liger-kernel")


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item()


def assert_as_accurate(candidate: torch.Tensor, torch_path: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """``candidate`` is no further from the fp64 ``reference`` than twice the torch path's error (plus fp32 ulps
    of the reference, for outputs the torch path happens to round exactly)."""
    floor = reference.double().abs().max().item() * 2 ** -20
    assert max_error(candidate, reference) <= 2 * max_error(torch_path, reference) + floor, \
        (what, max_error(candidate, reference), max_error(torch_path, reference))


def outputs_and_grads(function, inputs: list[torch.Tensor], dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    """``function``'s outputs and the gradients of its inputs under a fixed random upstream gradient. The inputs
    are copies: liger's SwiGLU writes its gradients into its inputs' storage (``.to`` of an fp32 tensor to fp32
    would hand it the caller's tensors, and the next function compared would read gradients as inputs)."""
    leaves = [x.detach().clone().to(dtype).requires_grad_() for x in inputs]
    outputs = function(*leaves)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    generator = torch.Generator(device="cuda").manual_seed(seed)
    upstream = [torch.randn(o.shape, device="cuda", generator=generator, dtype=o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [o.detach() for o in outputs] + list(grads)


def compare(liger_function, torch_function, inputs: list[torch.Tensor], what: str) -> None:
    fp32_liger = outputs_and_grads(liger_function, inputs, torch.float32)
    fp32_torch = outputs_and_grads(torch_function, inputs, torch.float32)
    for index, (a, b) in enumerate(zip(fp32_liger, fp32_torch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{what} fp32 #{index}")
    reference = outputs_and_grads(torch_function, inputs, torch.float64)
    bf16_liger = outputs_and_grads(liger_function, inputs, torch.bfloat16)
    bf16_torch = outputs_and_grads(torch_function, inputs, torch.bfloat16)
    for index, (a, b, r) in enumerate(zip(bf16_liger, bf16_torch, reference)):
        assert_as_accurate(a, b, r, f"{what} bf16 #{index}")


def rms_norm_case():
    """``(liger's function, the torch function, inputs)``: RMSNorm."""
    x = torch.randn(2, 128, 256, device="cuda")
    weight = 1 + 0.1 * torch.randn(256, device="cuda")
    return lambda x, w: kernels.liger_rms_norm(x, w, 1e-5), lambda x, w: kernels.rms_norm(x, w, 1e-5), [x, weight]


def swiglu_case():
    return kernels.liger_swiglu, kernels.swiglu, [torch.randn(2, 128, 512, device="cuda"),
                                                  torch.randn(2, 128, 512, device="cuda")]


def rotary_case():
    q, k = torch.randn(2, 8, 128, 64, device="cuda"), torch.randn(2, 2, 128, 64, device="cuda")
    positions = torch.stack([torch.arange(128), torch.arange(128).remainder(50)]).cuda()  # a packed row too
    angles = positions[..., None].float() * (10000 ** (-torch.arange(0, 64, 2, device="cuda") / 64))
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return (lambda q, k: kernels.liger_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype)),
            lambda q, k: kernels.rotary(q, k, cos.to(q.dtype), sin.to(q.dtype)), [q, k])


@LIGER
@pytest.mark.parametrize("case", [rms_norm_case, swiglu_case, rotary_case], ids=["rms_norm", "swiglu", "rotary"])
def test_liger_decoder_kernels_equal_the_torch_kernels(case):
    torch.manual_seed(0)
    liger_function, torch_function, inputs = case()
    compare(liger_function, torch_function, inputs, case.__name__.removesuffix("_case"))


@LIGER
def test_liger_fused_linear_cross_entropy_equals_the_chunked_loss():
    torch.manual_seed(0)
    hidden = torch.randn(1024, 256, device="cuda")
    weight = 0.05 * torch.randn(3001, 256, device="cuda")
    targets = torch.randint(0, 3001, (1024,), device="cuda")
    targets[::7] = -100  # unlabelled tokens count for nothing
    compare(lambda h, w: liger_linear_cross_entropy(h, w, targets),
            lambda h, w: chunked_linear_cross_entropy(h, w, targets, 256), [hidden, weight], "fused linear CE")


@CUDA
def test_compiled_loss_equals_the_eager_loss_on_gpu():
    from pipellm.pipeline.loss import compiled_cross_entropy, logits_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 512, 3001, device="cuda")
    targets = torch.randint(0, 3001, (2, 512), device="cuda")
    targets[:, :100] = -100
    reference = outputs_and_grads(lambda x: logits_cross_entropy(x, targets), [logits], torch.float64)
    eager = outputs_and_grads(lambda x: logits_cross_entropy(x, targets), [logits], torch.bfloat16)
    compiled = outputs_and_grads(lambda x: compiled_cross_entropy()(x, targets), [logits], torch.bfloat16)
    for index, (a, b, r) in enumerate(zip(compiled, eager, reference)):
        assert_as_accurate(a, b, r, f"compiled cross entropy #{index}")
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=0)


@CUDA
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_each_sdpa_backend_is_as_accurate_as_the_default(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda") for _ in range(3))
    positions = torch.arange(256, device="cuda").expand(2, -1)

    def attention(options):
        return lambda q, k, v: causal_attention(q, k, v, options, positions)

    reference = outputs_and_grads(attention(AttentionOptions(sdpa_backend="math")), [q, k, v], torch.float64)
    default = outputs_and_grads(attention(AttentionOptions()), [q, k, v], torch.bfloat16)
    chosen = outputs_and_grads(attention(AttentionOptions(sdpa_backend=backend)), [q, k, v], torch.bfloat16)
    for index, (a, b, r) in enumerate(zip(chosen, default, reference)):
        assert_as_accurate(a, b, r, f"{backend} #{index}")


class Pair(NamedTuple):
    targets: torch.Tensor
    scale: torch.Tensor


def leaves(tree) -> list[torch.Tensor]:
    return [tree] if torch.is_tensor(tree) else [leaf for item in tree for leaf in leaves(item)]


@CUDA
def test_early_batch_copy_keeps_every_tensor_and_structure():
    from pipellm.training.pipeline_engine import on_device

    batches = [((torch.arange(6).view(2, 3), torch.zeros(2, 3, dtype=torch.long)), Pair(torch.ones(2, 3),
                                                                                           torch.tensor([0.5])))]
    moved = on_device(batches, torch.device("cuda"))
    assert isinstance(moved, list) and isinstance(moved[0][1], Pair) and isinstance(moved[0][0], tuple)
    for before, after in zip(leaves(batches), leaves(moved)):
        assert after.is_cuda and after.dtype == before.dtype
        assert torch.equal(after.cpu(), before)


@CUDA
@pytest.mark.parametrize("speed", [
    pytest.param({"liger_kernels": True}, marks=LIGER), pytest.param({"loss_kernel": "liger"}, marks=LIGER),
    {"loss_kernel": "compiled"}, {"sdpa_backend": "efficient"},
    pytest.param({"liger_kernels": True, "loss_kernel": "liger", "sdpa_backend": "efficient"}, marks=LIGER)])
def test_a_stage_with_levers_equals_the_torch_stage(speed):
    """The tiny llama's embedding, decoders, norm and head as the pipeline builds them, fp32 on the GPU: loss and
    every gradient with the levers on equal the torch path's."""
    from pipellm.config.schema import Speed
    from pipellm.data.batches import micro_batches
    from pipellm.models import load_model_config
    from pipellm.pipeline.loss import token_mean_loss
    from pipellm.pipeline.stages import layer_specs
    from pipellm.quickstart import TINY_LLAMA

    config, family = load_model_config(TINY_LLAMA)
    results = []
    for levers in (Speed(), Speed(**speed)):
        specs = layer_specs(family, config, use_grad_ckpt=False, compile_layers=False,
                            attention=AttentionOptions(sdpa_backend=levers.sdpa_backend),
                            loss_kernel=levers.loss_kernel)
        with torch.device("cuda"):
            model = torch.nn.ModuleList([spec.build() for spec in specs])
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        if levers.liger_kernels:
            assert kernels.use_liger_kernels(model) > 0
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(4, config.vocab_size, (2, 64), generator=generator)
        (inputs, labels), = micro_batches(ids.cuda(), ids.cuda(), 2, 0, 1, torch.arange(64).expand(2, -1).cuda())
        hidden = inputs
        for layer in model[:-1]:
            hidden = layer(hidden)
        loss = token_mean_loss(model[-1](hidden), labels, kernel=levers.loss_kernel)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (torch_loss, torch_grads), (lever_loss, lever_grads) = results
    torch.testing.assert_close(lever_loss, torch_loss, rtol=1e-5, atol=1e-5)
    for key, grad in torch_grads.items():
        torch.testing.assert_close(lever_grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)
