"""Family-agnostic harness for the equivalence tests: run a pipeline on a reference model's weights and batch,
capture its loss and every parameter gradient (named by the reference's checkpoint keys), and compare.

A family's test builds a tiny fp32 reference, computes its loss and gradients on ``make_batch``'s rows, and
hands the reference state dict (in the family's checkpoint layout) to ``run_pipeline``.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from conftest import REPO
from distributed import free_port, run_distributed

MICRO_BATCH = 2
SEQ = 12
CHUNK_TOKENS = 5
"""``loss_chunk_tokens`` of the chunked-loss cases: 24 tokens per micro batch make chunks of 5, 5, 5, 5, 4."""
LAUNCHER_DATA = str(REPO / "pipellm" / "assets" / "data" / "sample.jsonl")


def make_batch(global_batch: int, generator: torch.Generator, vocab_size: int = 97):
    """Right-padded rows of different lengths; the first tokens of some rows are an untrained prompt."""
    input_ids = torch.randint(1, vocab_size, (global_batch, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row in range(global_batch):
        length = SEQ - (row * 3) % 7
        input_ids[row, length:] = 0
        attention_mask[row, length:] = 0
        labels[row, length:] = -100
        labels[row, : row % 3] = -100
    return input_ids, attention_mask, labels


class GradCapture(torch.optim.Optimizer):
    """Records gradients instead of stepping."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.grads = None

    def step(self, closure=None):
        self.grads = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None}


def pipeline_rank(rank, family_name, cases, dims, gas, out_dir):
    """Run every ``(config, state_dict, batch[, loss_chunk_tokens])`` case in this process (one spawn amortised
    over the cases)."""
    results = [_train_batch(family_name, *case[:3], dims, gas, *case[3:]) for case in cases]
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _train_batch(family_name, config, state_dict, batch, dims, gas, loss_chunk_tokens=None, lora=None) -> dict:
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.data.batches import micro_batches
    from pipellm.models import get_family
    from pipellm.pipeline.stages import build_pipeline

    family = get_family(family_name)
    topology = ProcessTopology(axes=["pipe", "data"], dims=dims)
    model = build_pipeline(family, config, topology, "uniform", seed=0, loss_chunk_tokens=loss_chunk_tokens)
    if lora is not None:
        add_lora(model, family, config, lora)
    names = load_reference_weights(model, family, config, state_dict)
    optimizer = GradCapture(model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO_BATCH * gas * dims[1], "steps_per_print": 10**9,
        "gradient_clipping": 0.0})  # DeepSpeed clips at 1.0 unless told otherwise
    input_ids, _, labels = batch
    data_rank = model.data_parallel_rank
    loss = engine.train_batch(iter(micro_batches(input_ids, labels, MICRO_BATCH, data_rank, dims[1])))
    grads = {names[key]: grad for key, grad in optimizer.grads.items() if key in names}
    unused = [grad for key, grad in optimizer.grads.items() if key not in names]
    assert all(not grad.any() for grad in unused), "an unused copy of a tied module got a gradient"
    return {"loss": loss.detach().clone(), "grads": grads}


def add_lora(model, family, config, lora) -> None:
    """LoRA (``pipellm.config.schema.Lora``) on a built pipeline: peft's adapters go in first, as in training, and
    only they and the ``modules_to_save`` layers train; a reference state dict then holds the base and adapter
    weights under the names peft gives them on the transformers model."""
    from pipellm.pipeline.weights import checkpoint_named_parameters
    from pipellm.training.lora import LoraParameters
    from pipellm.training.pipeline_engine import prepare_layers

    parameter_set = LoraParameters(lora, seed=0, key_map=family.key_map, full_kinds=frozenset(lora.modules_to_save))
    prepare_layers(model, family, config, parameter_set)
    parameter_set.trainable(checkpoint_named_parameters(model, family, config))


def load_reference_weights(model, family, config, state_dict) -> dict[int, str]:
    """Load this rank's layers straight from the reference state dict through the family's key map; the
    checkpoint key of each parameter that computes, by ``id``."""
    from pipellm.pipeline.partition import PipelineLayers
    from pipellm.pipeline.weights import layer_module

    layers, names = PipelineLayers.of(family, config), {}
    for index, layer in zip(model.local_layer_indices, model.forward_funcs):
        module = layer_module(layer)
        kind, decoder_index = layers.kind(layers.file_index(index))  # a tied head's weights are the embedding's
        keys = {k: family.key_map.hf_key(kind, decoder_index, k) for k in module.state_dict()}
        module.load_state_dict({k: state_dict[hf] for k, hf in keys.items()})
        params = list(module.named_parameters())
        if isinstance(layer, functools.partial):
            # A tied head computes with the tied weight only; the rest of its copy of the embedding module
            # (bloom's word_embeddings_layernorm on the last stage) is unused there.
            params = [(n, p) for n, p in params if n == family.tied_weight]
        names.update({id(p): keys[n] for n, p in params})
    return names


def run_pipelines(family_name: str, cases: list[tuple], dims, gas, out_dir: Path) -> list[list[dict]]:
    """For each ``(config, state_dict, batch[, loss_chunk_tokens])`` case, each rank's ``{"loss", "grads"}``
    after one ``train_batch`` of the pipeline on ``dims = [pipe, data]``."""
    world = dims[0] * dims[1]
    run_distributed(world, pipeline_rank, family_name, cases, dims, gas, str(out_dir))
    per_rank = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return [list(ranks) for ranks in zip(*per_rank)]


def cases_rank(rank, cases, out_dir):
    """Every case (``dict(family, config, state_dict, batch, dims, gas[, loss_chunk_tokens][, lora])``) in this
    process."""
    results = [_train_batch(c["family"], c["config"], c["state_dict"], c["batch"], c["dims"], c["gas"],
                            c.get("loss_chunk_tokens"), c.get("lora")) for c in cases]
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def run_cases(cases: list[dict], out_dir: Path) -> list[list[dict]]:
    """``run_pipelines`` for cases of any families, grids (of one world size) and accumulation steps, in one spawn
    of the process group."""
    world = cases[0]["dims"][0] * cases[0]["dims"][1]
    run_distributed(world, cases_rank, cases, str(out_dir))
    per_rank = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return [list(ranks) for ranks in zip(*per_rank)]


def run_pipeline(family_name: str, config, state_dict, batch, dims, gas, out_dir: Path) -> list[dict]:
    """``run_pipelines`` for one case."""
    return run_pipelines(family_name, [(config, state_dict, batch)], dims, gas, out_dir)[0]


def run_pipeline_both_losses(family_name: str, config, state_dict, batch, dims, gas, out_dir: Path
                             ) -> list[list[dict]]:
    """``run_pipeline`` with the whole-batch loss and with ``loss_chunk_tokens=CHUNK_TOKENS``, in one spawn."""
    cases = [(config, state_dict, batch), (config, state_dict, batch, CHUNK_TOKENS)]
    return run_pipelines(family_name, cases, dims, gas, out_dir)


def assert_matches_reference(results: list[dict], ref_loss: torch.Tensor, ref_grads: dict[str, torch.Tensor],
                             expected: set[str]) -> None:
    """Every rank's loss equals the reference's; every gradient a stage holds equals the reference's; together
    the stages hold a gradient for exactly the ``expected`` checkpoint keys."""
    seen = set()
    for result in results:
        torch.testing.assert_close(result["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == expected


def train_through_launcher(tmp_path: Path, model_path: Path, parts: list[int] | str, n_epochs: int = 2,
                           save_steps: int = 10) -> tuple[Path, list[dict]]:
    """``deepspeed --num_gpus 2 train_ds.py`` on two pipeline stages (CPU processes) over the sample data;
    returns the save directory and the metrics records."""
    config = two_stage_config(tmp_path, model_path, parts, n_epochs, save_steps)
    return Path(config["save_path"]), launch_training(config, tmp_path / "config.yml")


def train_two_stages(tmp_path: Path, model_path: Path, parts: list[int] | str, n_epochs: int = 2,
                     save_steps: int = 10) -> tuple[Path, list[dict]]:
    """``train_through_launcher``'s run on two ranks spawned in-process (``spawn_training``)."""
    config = two_stage_config(tmp_path, model_path, parts, n_epochs, save_steps)
    return Path(config["save_path"]), spawn_training(config, tmp_path / "config.yml")


def two_stage_config(tmp_path: Path, model_path: Path, parts: list[int] | str, n_epochs: int, save_steps: int
                     ) -> dict:
    """2 stages x 1 replica over the sample data, batches of 16 in micro batches of 4."""
    return {"model_path": str(model_path), "save_path": str(tmp_path / "save"), "data_path": LAUNCHER_DATA,
            "max_seq_len": 64, "n_epochs": n_epochs, "log_steps": 1, "save_steps": save_steps, "seed": 1,
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": parts},
            "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
            "gradient_clipping": 1.0, "data_cache_dir": str(tmp_path / "data_cache")}


def launch_training(config: dict, config_path: Path, script: str = "train_ds.py") -> list[dict]:
    """Write ``config`` to ``config_path``, train it with ``deepspeed --num_gpus 2 <script>`` (must succeed)
    and return its ``metrics.jsonl`` records."""
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), script, "--config", str(config_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_records(config)


# The trainer module each launcher script runs (the scripts are two-line wrappers around its ``main``).
SCRIPT_MAINS = {"train_ds.py": "pipellm.training.train", "train_ds_zero.py": "pipellm.training.zero"}


def spawn_training(config: dict, config_path: Path, script: str = "train_ds.py") -> list[dict]:
    """``launch_training`` on two ranks spawned in-process (``run_distributed`` sets RANK/WORLD_SIZE as the
    launcher does): the same training without the launcher's two extra Python start-ups, for tests that are not
    about the launcher."""
    config_path.write_text(yaml.safe_dump(config))
    spawn_config(config_path, script)
    return run_records(config)


def spawn_config(config_path: Path, script: str = "train_ds.py") -> None:
    """``<script> --config config_path`` on two ranks spawned in-process; raises if a rank fails."""
    run_distributed(2, _train_rank, SCRIPT_MAINS[script], str(config_path))


def run_records(config: dict) -> list[dict]:
    """The ``metrics.jsonl`` records of ``config``'s run."""
    return [json.loads(line) for line in (Path(config["save_path"]) / "metrics.jsonl").read_text().splitlines()]


def _train_rank(rank: int, module: str, config_path: str) -> None:
    import importlib

    importlib.import_module(module).main(["--config", config_path])  # a failure raises (SystemExit included)


def copy_tiny_tokenizer(dest: Path) -> None:
    """The embedded tiny llama's tokenizer (1017 tokens) into a model directory, for launcher runs of any family."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "pipellm" / "assets" / "tiny_llama" / name, dest / name)
