"""Each extension point of the trainer with a toy defined here, without touching pipellm's code.

* An **objective**: label-smoothed cross entropy (``LabelSmoothedCrossEntropy`` below), selected by the config's
  ``objective: test_extension_points:LabelSmoothedCrossEntropy`` (this directory on PYTHONPATH), trains through
  the launcher on 2 pipeline stages and on ZeRO-3. The first step's loss of both is torch's
  ``cross_entropy(label_smoothing=...)`` of the transformers model on the same global batch, and the records
  carry the objective's own figures.
* A **parameter set** that freezes the embedding and a **schedule** that counts its batches drive a one-process
  ``PipelineEngine``: the embedding stays as it was, everything else trains, every batch ran through the toy.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO
from distributed import run_distributed
from test_zero import BASE, launch

SMOOTHING = 0.1
OBJECTIVE = "test_extension_points:LabelSmoothedCrossEntropy"


class LabelSmoothedCrossEntropy:
    """Cross entropy with label smoothing, summed over the labelled tokens and scaled like ``token_mean_loss``,
    so the engines' mean is the smoothed cross entropy averaged over the global batch's labelled tokens."""

    def __init__(self, cfg):
        if cfg.loss_chunk_tokens is not None:
            raise ValueError("label smoothing needs the logits: leave loss_chunk_tokens unset")

    def loss(self, output, labels):
        from pipellm.data import IGNORE_INDEX

        targets, loss_scale = labels
        logits = output.logits.float()
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                label_smoothing=SMOOTHING, reduction="sum")
        return total * loss_scale.reshape(())

    def figures(self, loss: float, split: str) -> dict[str, float]:
        return {"label_smoothing": SMOOTHING} if split == "train" else {}


def first_batch_losses(config_path: Path, hf_dir: Path) -> tuple[float, float]:
    """The smoothed and the plain cross entropy of the transformers model on the run's first global batch."""
    from transformers import AutoModelForCausalLM

    from pipellm.config import load_config
    from pipellm.data import IGNORE_INDEX
    from pipellm.data.batches import Schedule, load_training_data, shift_targets
    from pipellm.data.tokenizer import load_tokenizer

    cfg = load_config(config_path)
    data = load_training_data(cfg, load_tokenizer(hf_dir), show_progress=False)
    input_ids, labels, position_ids, _ = data.rows_of(Schedule(data.plan, cfg.n_epochs, cfg.max_steps).batch(0))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.flatten(0, 1)
    targets = shift_targets(labels).flatten()
    return tuple(float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=smoothing))
                 for smoothing in (SMOOTHING, 0.0))


def test_an_objective_defined_here_trains_on_both_engines(tmp_path, tiny_pp_model, monkeypatch):
    hf_dir, pp_dir = tiny_pp_model
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    common = {**BASE, "data_cache_dir": str(tmp_path / "data_cache"), "max_steps": 2, "save_final": False,
              "objective": OBJECTIVE}
    pipe = launch("train_ds.py", {**common, "model_path": str(pp_dir), "save_path": str(tmp_path / "pipe"),
                                  "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]},
                                                 "parts": [3, 3]}}, tmp_path / "pipe.yml")
    zero = launch("train_ds_zero.py", {**common, "model_path": str(hf_dir), "save_path": str(tmp_path / "zero"),
                                       "model_topo": {"process_topology": {"axes": ["pipe", "data"],
                                                                           "dims": [1, 2]}}}, tmp_path / "zero.yml")
    smoothed, plain = first_batch_losses(tmp_path / "zero.yml", hf_dir)
    # The objective matters: the plain cross entropy (the default objective) would fail the check below tenfold.
    assert plain != pytest.approx(smoothed, rel=1e-4)
    for records in (pipe, zero):
        assert [r["step"] for r in records] == [1, 2]
        assert records[0]["loss"] == pytest.approx(smoothed, rel=1e-5)
        assert all(r["label_smoothing"] == SMOOTHING for r in records)
        # Evaluated at the end with the objective: eval_loss, and none of token_mean's figures (eval_ppl).
        assert records[-1]["eval_loss"] > 0 and "eval_ppl" not in records[-1]


class FrozenEmbedding:
    """A parameter set that trains everything but the input embedding (and leaves it out of checkpoints)."""

    saves_frozen = False

    def trainable(self, named_parameters):
        for name, param in named_parameters:
            param.requires_grad_(name != "model.embed_tokens.weight")
        return [(name, param) for name, param in named_parameters if param.requires_grad]


class CountingSchedule:
    """DeepSpeed's 1F1B, counting the global batches it ran."""

    def __init__(self):
        self.trained = self.evaluated = 0

    def train_batch(self, engine, micro_batches):
        self.trained += 1
        return engine.train_batch(iter(micro_batches))

    def eval_batch(self, engine, micro_batches):
        self.evaluated += 1
        return engine.eval_batch(iter(micro_batches))


def engine_with_toys(rank: int, config_path: str, out: str) -> None:
    """Two training steps and one eval of a one-stage ``PipelineEngine`` with both toys; what changed."""
    from pipellm.config import load_config
    from pipellm.data.batches import micro_batches
    from pipellm.models import load_model_config
    from pipellm.pipeline.loss import TokenMeanCrossEntropy
    from pipellm.pipeline.weights import checkpoint_named_parameters
    from pipellm.training.engine import EngineSetup
    from pipellm.training.pipeline_engine import PipelineEngine

    cfg = load_config(config_path)
    hf_config, family = load_model_config(cfg.model_path)
    schedule = CountingSchedule()
    engine = PipelineEngine(cfg, EngineSetup(None, 2, TokenMeanCrossEntropy(), FrozenEmbedding()),
                            hf_config=hf_config, family=family, schedule=schedule)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, hf_config.vocab_size, (cfg.global_batch_size, 16), generator=generator)
    batches = micro_batches(ids, ids.clone(), cfg.micro_batch_size, engine.replica, engine.replicas)
    named = dict(checkpoint_named_parameters(engine.model, family, hf_config))
    before = {name: param.detach().clone() for name, param in named.items()}
    losses = [engine.train_step(batches) for _ in range(2)] + [engine.eval_step(batches)]
    torch.save({"losses": losses, "schedule": [schedule.trained, schedule.evaluated],
                "changed": {name: not torch.equal(before[name], param) for name, param in named.items()}}, out)


def test_a_parameter_set_and_a_schedule_defined_here_drive_the_pipeline_engine(tmp_path, tiny_pp_model):
    config = {"model_path": str(tiny_pp_model[1]), "save_path": str(tmp_path / "save"), "data_path": BASE["data_path"],
              "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": "uniform"}}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    run_distributed(1, engine_with_toys, str(tmp_path / "c.yml"), str(tmp_path / "result.pt"))
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["schedule"] == [2, 1]
    assert all(math.isfinite(loss) for loss in result["losses"]) and result["losses"][1] < result["losses"][0]
    changed = result["changed"]
    assert changed.pop("model.embed_tokens.weight") is False  # frozen: the optimizer never stepped it
    assert changed and all(changed.values())


@pytest.mark.parametrize("name, message", [
    ("label_smoothing", "is not one of token_mean, dpo, reward and not `module:attribute`"),
    ("no_such_module:Objective", "cannot import no_such_module"),
    ("test_extension_points:Missing", "test_extension_points has no callable Missing"),
])
def test_an_objective_that_cannot_be_built_is_one_line(name, message):
    from pipellm.errors import PipellmError
    from pipellm.training.objective import objective_factory

    with pytest.raises(PipellmError, match=message) as error:
        objective_factory(name)
    assert "\n" not in str(error.value)
