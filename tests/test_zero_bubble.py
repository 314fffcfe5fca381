"""The zero-bubble ZB-H1 schedule (``pipellm.pipeline.zero_bubble``) trains exactly as 1F1B does, in the
simulator's order.

On one process group of 4 CPU ranks, each case builds the same seeded tiny model twice and runs one global batch
with DeepSpeed's 1F1B and with ZB-H1: the losses and every parameter gradient agree (fp32), and every stage ran
its F/B/W passes in the order of ``pipellm.plan.schedules.zb_h1`` (what ``pipellm.plan --schedule zb-h1`` prints).
Cases: llama on 4 stages with tied embeddings and grad checkpointing; mixtral (router aux loss) on 2 stages x 2
replicas with ZeRO-1 (its flat fp32 gradient partitions compared); llama on 2 stages x 2 replicas with tied
embeddings, LoRA (adapters only train: the frozen tied embedding leaves the tied gradients' all-reduce) and bf16
(DeepSpeed's bf16 optimizer, each gradient accumulated as it arrives as pipellm runs it), compared on the weights
after two AdamW steps.
fp32 gradients agree to rounding (rtol 1e-5, atol 1e-7: the same terms added in another order, e.g. 1F1B's last
stage divides the loss by the accumulation steps, ZB-H1's the gradient of the stage's output); the bf16 weights
bit for bit. ``train_ds.py`` with
``pipeline_schedule: zb-h1`` trains the same loss curve as with 1F1B, and the config check refuses fp16, ZeRO 2 and
compiled layers (whose unset default is eager under zb-h1).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig

from distributed import run_distributed
from equivalence import MICRO_BATCH, make_batch, spawn_config
from pipellm.config.schema import Lora
from launches import losses, write_config

LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
MIXTRAL = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        initializer_range=0.2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                        router_aux_loss_coef=0.1, pad_token_id=None)
CASES = {
    "llama-4stage-tied-ckpt": dict(family="llama", config=LlamaConfig(**LLAMA, tie_word_embeddings=True),
                                   dims=[4, 1], gas=6, grad_ckpt=True),
    "mixtral-2stage-2replica-zero1": dict(family="mixtral", config=MIXTRAL, dims=[2, 2], gas=3,
                                          deepspeed={"zero_optimization": {"stage": 1}}),
    "llama-2stage-2replica-lora-bf16": dict(family="llama", config=LlamaConfig(**LLAMA, tie_word_embeddings=True),
                                            dims=[2, 2], gas=4, steps=2, lora=Lora(r=4, alpha=8.0),
                                            # pipellm's default under bf16 (pipeline_deepspeed_config)
                                            deepspeed={"bf16": {"enabled": True, "immediate_grad_update": True}}),
}


def run_schedule(case: dict, schedule_name: str) -> dict:
    """One case under one schedule on this rank: the loss, and the gradients (one step, fp32) or the weights
    after ``steps`` AdamW steps; with ZB-H1, the passes each step ran."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.data.batches import micro_batches
    from pipellm.models import get_family
    from pipellm.pipeline.schedule import schedule_named
    from pipellm.pipeline.stages import build_pipeline
    from equivalence import GradCapture

    dims, gas, steps = case["dims"], case["gas"], case.get("steps")

    model = build_pipeline(get_family(case["family"]), case["config"], ProcessTopology(axes=["pipe", "data"],
                           dims=dims), "uniform", seed=0, use_grad_ckpt=case.get("grad_ckpt", False))
    if "lora" in case:
        add_lora(model, case["family"], case["config"], case["lora"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = GradCapture(trainable) if steps is None else torch.optim.AdamW(trainable, lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO_BATCH * gas * dims[1], "steps_per_print": 10**9, "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True, **case.get("deepspeed", {})})
    schedule = schedule_named(schedule_name, recompute=case.get("grad_ckpt", False))
    if hasattr(schedule, "attach"):
        schedule.attach(engine)
    result = {"losses": [], "orders": [], "unsplit": []}
    for step in range(steps or 1):
        input_ids, _, labels = make_batch(MICRO_BATCH * gas * dims[1], torch.Generator().manual_seed(step))
        batches = micro_batches(input_ids, labels, MICRO_BATCH, model.data_parallel_rank, dims[1])
        result["losses"].append(schedule.train_batch(engine, batches).detach().clone())
        result["orders"].append(list(getattr(schedule, "executed", [])))
        result["unsplit"].append(getattr(schedule, "unsplit", 0))
    if steps is None:  # ZeRO-1 steps its flat fp32 partitions: they are compared in their order
        names = {id(p): name for name, p in model.named_parameters()}
        result["tensors"] = {names.get(key, f"flat partition {i}"): grad
                             for i, (key, grad) in enumerate(optimizer.grads.items())}
    else:
        result["tensors"] = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    return result


def add_lora(model, family_name: str, config, lora: Lora) -> None:
    """peft's adapters into the stage's decoders, only they train (as ``train_ds.py`` does with ``lora:``)."""
    from pipellm.models import get_family
    from pipellm.pipeline.weights import checkpoint_named_parameters
    from pipellm.training.lora import LoraParameters
    from pipellm.training.pipeline_engine import prepare_layers

    family = get_family(family_name)
    parameter_set = LoraParameters(lora, seed=0, key_map=family.key_map)
    prepare_layers(model, family, config, parameter_set)
    parameter_set.trainable(checkpoint_named_parameters(model, family, config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero, which would leave A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def both_schedules(rank: int, out_dir: str) -> None:
    # 4 ranks on CI's 2 cores: torch's default intra-op threads per rank would oversubscribe them. Both schedules
    # run in this process with the same setting, so what is compared is unchanged.
    torch.set_num_threads(1)
    results = {name: {schedule: run_schedule(case, schedule) for schedule in ("1f1b", "zb-h1")}
               for name, case in CASES.items()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("zero_bubble")
    run_distributed(4, both_schedules, str(out))
    return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in range(4)]


@pytest.mark.parametrize("name", list(CASES))
def test_zb_h1_trains_as_1f1b(per_rank, name):
    for rank, results in enumerate(per_rank):
        one_f_one_b, zero_bubble = results[name]["1f1b"], results[name]["zb-h1"]
        torch.testing.assert_close(torch.stack(zero_bubble["losses"]), torch.stack(one_f_one_b["losses"]),
                                   rtol=1e-6, atol=0)
        assert zero_bubble["tensors"].keys() == one_f_one_b["tensors"].keys() and zero_bubble["tensors"]
        bf16 = "bf16" in CASES[name].get("deepspeed", {})
        for key, expected in one_f_one_b["tensors"].items():
            assert not bf16 or torch.equal(zero_bubble["tensors"][key], expected), f"rank {rank} {key}"
            torch.testing.assert_close(zero_bubble["tensors"][key], expected, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank} {key}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_each_stage_runs_the_simulators_zb_h1_order(per_rank, name):
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.plan.schedules import zb_h1

    dims, gas = CASES[name]["dims"], CASES[name]["gas"]
    topology = ProcessTopology(axes=["pipe", "data"], dims=dims)
    for rank, results in enumerate(per_rank):
        stage = topology.get_coord(rank).pipe
        for order in results[name]["zb-h1"]["orders"]:
            assert [tuple(op) for op in order] == zb_h1(stage, dims[0], gas), f"rank {rank}"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_train_ds_with_zb_h1_trains_the_1f1b_loss_curve(compiled, tmp_path, tiny_pp_model, launcher_run_2x1):
    """Compiled: the decoders and the loss compiled (their linear layers outside the graphs); the eager 1F1B run
    is the reference, which compiled layers match to fp32 rounding."""
    speed = dict(compile_layers=True, speed={"loss_kernel": "compiled"}) if compiled else {}
    config = write_config(tmp_path / "zb.yml", tiny_pp_model[1], tmp_path / "zb", [2, 1], pipeline_schedule="zb-h1",
                          **speed)
    spawn_config(config)  # two ranks spawned in-process: the launcher is not what is tested here
    assert losses(tmp_path / "zb") == pytest.approx(losses(launcher_run_2x1), rel=1e-5)


@pytest.mark.parametrize("overrides,expected", [
    (dict(pipeline_schedule="zb-h2"), "`pipeline_schedule` must be one of 1f1b, zb-h1"),
    (dict(pipeline_schedule="zb-h1", fp16={"enabled": True}), "`pipeline_schedule: zb-h1` runs with fp32 or bf16"),
    (dict(pipeline_schedule="zb-h1", zero_optimization={"stage": 2}), "and ZeRO stage 0 or 1"),
])
def test_zb_h1_config_is_checked(overrides, expected, tmp_path, tiny_pp_model, capsys, monkeypatch):
    import test_config  # its config and one-line-error helpers

    path = test_config.write_config(tmp_path, tiny_pp_model, **overrides)
    test_config.assert_fails(capsys, monkeypatch, tmp_path, path, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_w_is_split_from_b_where_it_can_be(per_rank, name):
    """Past the first stage (whose inputs take no gradient), W starts where B left the weights' gradients,
    except with grad checkpointing (``pipellm.pipeline.split_backward``)."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    dims, gas = CASES[name]["dims"], CASES[name]["gas"]
    topology = ProcessTopology(axes=["pipe", "data"], dims=dims)
    for rank, results in enumerate(per_rank):
        first, ckpt = topology.get_coord(rank).pipe == 0, CASES[name].get("grad_ckpt", False)
        unsplit = results[name]["zb-h1"]["unsplit"]
        assert unsplit == [gas if first or ckpt else 0] * len(unsplit), f"rank {rank}"


def test_w_runs_only_the_weight_side_of_the_graph():
    """``SplitBackward``: B and W give the gradients of one backward, and W runs no node of the input path but
    the boundary nodes (here: no activation's, norm's or residual add's backward)."""
    from pipellm.pipeline.split_backward import SplitBackward

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8),
                                 torch.nn.LayerNorm(8))
    x, grad = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    (x + layers(x)).backward(grad)
    expected = [x.grad] + [p.grad for p in layers.parameters()]
    x.grad = None
    layers.zero_grad(set_to_none=True)

    out = x + layers(x)
    split = SplitBackward([out], [grad], [x], list(layers.parameters()), recompute=False)
    assert split.split and all(p.grad is None for p in layers.parameters())
    ran = []
    nodes, queue = set(), [out.grad_fn]
    while queue:
        node = queue.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            node.register_prehook(lambda grads, node=node: ran.append(node.name()))
            queue += [child for child, _ in node.next_functions]
    split.weight_grads()
    assert not {"GeluBackward0", "AddBackward0"} & set(ran) and ran, ran
    for got, want in zip([x.grad] + [p.grad for p in layers.parameters()], expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_compiled_layers_split_b_and_w_apart_from_the_compiled_graphs(monkeypatch):
    """Compiled decoders prepared by ``separate_weight_grads`` (a last stage: decoders, norm, head and the compiled
    loss): B leaves the gradients of the decoders' norms (whose boundary node is a compiled graph, which computes
    every gradient it has anyway) and of the inputs; W runs no compiled graph again, only the linear layers'
    weight side and the eager final norm's and head's; together they give one backward's gradients bit for bit."""
    from pipellm.models import get_family
    from pipellm.models.attention import AttentionOptions
    from pipellm.pipeline.loss import token_mean_loss
    from pipellm.pipeline.split_backward import SplitBackward, separate_weight_grads
    from pipellm.pipeline.stages import init_weights, layer_specs

    monkeypatch.setattr(torch._functorch.config, "donated_buffer", torch._functorch.config.donated_buffer)
    config = LlamaConfig(**LLAMA)
    family = get_family("llama")
    specs = layer_specs(family, config, False, AttentionOptions(), compile_layers=True, loss_kernel="compiled")
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(spec.build() for spec in specs[1:])  # decoders, final norm, head
    for layer in layers:
        init_weights(layer, 0.1)
    separate_weight_grads(layers)
    params = list(layers.parameters())
    targets = torch.randint(0, LLAMA["vocab_size"], (2, 16))

    def forward():
        hidden = torch.randn(2, 16, LLAMA["hidden_size"], generator=torch.Generator().manual_seed(1),
                             requires_grad=True)
        outputs = (hidden, torch.arange(16).expand(2, 16))
        for layer in layers:
            outputs = layer(outputs)
        return hidden, token_mean_loss(outputs, (targets, torch.tensor(1 / 32)), None, "compiled")

    hidden, loss = forward()
    loss.backward()
    expected = [hidden.grad] + [p.grad for p in params]
    layers.zero_grad(set_to_none=True)

    entered = []  # parameter gradients present when each autograd call that writes them begins

    @contextlib.contextmanager
    def writing_param_grads():
        entered.append(sum(p.grad is not None for p in params))
        yield

    hidden, loss = forward()
    split = SplitBackward([loss], None, [hidden], params, recompute=False, writing_param_grads=writing_param_grads)
    assert entered == [0]  # B writes the norms' gradients
    norms = {name for name, p in layers.named_parameters() if p.grad is not None}
    assert split.split and norms == {f"{i}.{norm}.weight" for i in range(LLAMA["num_hidden_layers"])
                                     for norm in ("input_layernorm", "post_attention_layernorm")}
    ran, nodes, queue = [], set(), [loss.grad_fn]
    while queue:
        node = queue.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            node.register_prehook(lambda grads, node=node: ran.append(type(node).__name__))
            queue += [child for child, _ in node.next_functions]
    assert "CompiledFunctionBackward" in {type(node).__name__ for node in nodes}
    split.weight_grads()
    assert "MmBackward0" in ran and "CompiledFunctionBackward" not in ran, ran
    assert entered == [0, len(norms)]
    for got, want in zip([hidden.grad] + [p.grad for p in params], expected):
        assert torch.equal(got, want)


def test_compile_layers_default_is_on_for_gpus_under_both_schedules():
    """``compile_layers: null`` compiles on GPUs, under 1F1B and ZB-H1; a set value is kept."""
    from pipellm.config.schema import TrainConfig

    def compiled(schedule, value, on_gpu):
        return TrainConfig(model_path="m", save_path="s", data_path="d", pipeline_schedule=schedule,
                           compile_layers=value).layers_compiled(on_gpu)

    for schedule in ("1f1b", "zb-h1"):
        assert [compiled(schedule, None, gpu) for gpu in (True, False)] == [True, False]
        assert compiled(schedule, False, True) is False and compiled(schedule, True, False) is True
