"""Packing, epochs, sharding and the tokenized-data cache.

* A packed row's per-token losses equal those of its samples run alone (attention never crosses samples,
  positions restart), through the real llama layers, for the plain SDPA path and the ``use_flash_attn`` path.
* Every sample is in exactly one row of exactly one replica per epoch (times its weight); the order is a pure
  function of the seed and the epoch.
* The cache is reused while nothing that matters changes, rebuilt when something does, and shared by processes.
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

import pipellm.data.cache as data_module
from pipellm.models.attention import AttentionOptions, sample_mask
from pipellm.data import IGNORE_INDEX
from pipellm.data.batches import (EpochPlan, SampleStore, Schedule, load_training_data, materialize, micro_batches, pack,
                             split_eval)
from pipellm.data.cache import tokenize_file
from pipellm.data.samples import DataOptions
from pipellm.errors import PipellmError

ASSETS = Path(__file__).resolve().parents[1] / "pipellm" / "assets"
MODEL_DIR = ASSETS / "tiny_llama"
DATA = ASSETS / "data"
EXAMPLES = [str(DATA / f"{k}.jsonl") for k in ("pretrain", "instruct", "conversation", "conver_has_api", "ref_qa")]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


# ----- packing -----

def test_pack_places_every_sample_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    ids = rng.permutation(500)
    offsets, flat = pack(ids, lengths, 128)
    assert sorted(flat.tolist()) == list(range(500))
    row_tokens = [lengths[flat[offsets[r]:offsets[r + 1]]].sum() for r in range(len(offsets) - 1)]
    assert max(row_tokens) <= 128
    assert sum(row_tokens) / (128 * len(row_tokens)) > 0.95  # best fit leaves little room
    again = pack(ids, lengths, 128)
    assert np.array_equal(again[0], offsets) and np.array_equal(again[1], flat)


def test_sample_mask_keeps_to_each_sample():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    mask = sample_mask(positions)[0, 0]
    segments = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for i in range(9):
        for j in range(9):
            assert bool(mask[i, j]) == (j <= i and segments[i] == segments[j]), (i, j)


def run_layers(layers, input_ids, position_ids):
    hidden = (input_ids, position_ids)
    for layer in layers:
        hidden = layer(hidden)
    return hidden


GPU = torch.cuda.is_available()
# On a GPU also bf16 (the flash path's dtypes) and compiled layers (the default there).
KERNEL_CASES = [(False, torch.float32, False), (True, torch.float32, False)] + (
    [(True, torch.bfloat16, False), (True, torch.bfloat16, True), (False, torch.float32, True)] if GPU else [])


@pytest.mark.parametrize("use_flash_attn, dtype, compile_layers", KERNEL_CASES,
                         ids=[f"flash{int(f)}-{str(d)[6:]}-compile{int(c)}" for f, d, c in KERNEL_CASES])
def test_packed_row_losses_equal_samples_alone(use_flash_attn, dtype, compile_layers):
    """Three samples packed in one row (plus padding) give each token the loss it has when its sample is
    alone in a padded row, with positions from 0; labels never reach across samples."""
    from pipellm.models import get_family
    from pipellm.pipeline.stages import layer_specs

    device = "cuda" if GPU else "cpu"
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    family = get_family("llama")
    with torch.device(device):
        layers = [spec.build().to(dtype) for spec in layer_specs(
            family, config, use_grad_ckpt=False, compile_layers=compile_layers,
            attention=AttentionOptions(use_flash_attn, packed=True))]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(4, 97, (n,), generator=gen) for n in (7, 12, 5)]
    seq = 32

    def row(sample_list):
        ids = torch.zeros(seq, dtype=torch.long)
        labels = torch.full((seq,), IGNORE_INDEX)
        positions = torch.arange(seq)
        at = 0
        for s in sample_list:
            ids[at:at + len(s)] = s
            labels[at + 1:at + len(s)] = s[1:]  # the first token of a sample is never a target
            positions[at:at + len(s)] = torch.arange(len(s))
            at += len(s)
        positions[at:] = positions[at - 1] + 1 + torch.arange(seq - at)
        return ids, labels, positions

    def token_losses(rows):
        ids, labels, positions = (torch.stack(t).to(device) for t in zip(*rows))
        (inputs, (targets, _)), = micro_batches(ids, labels, len(rows), 0, 1, positions)
        with torch.no_grad():
            logits = run_layers(layers, *inputs).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                                   reduction="none").view(targets.shape)
        return losses, targets

    packed_losses, packed_targets = token_losses([row(samples)])
    alone_losses, alone_targets = token_losses([row([s]) for s in samples])
    at = 0
    for i, s in enumerate(samples):
        n = len(s)
        # Position at + n - 1 (last token of sample i) must predict nothing: the next sample's first token is
        # not a target of it.
        assert torch.equal(packed_targets[0, at:at + n], alone_targets[i, :n])
        assert packed_targets[0, at + n - 1] == IGNORE_INDEX
        torch.testing.assert_close(packed_losses[0, at:at + n], alone_losses[i, :n], **tol)
        at += n
    # And changing one sample changes nobody else's losses.
    other = [samples[0], torch.randint(4, 97, (12,), generator=gen), samples[2]]
    changed, _ = token_losses([row(other)])
    torch.testing.assert_close(changed[0, :7], packed_losses[0, :7], **tol)
    torch.testing.assert_close(changed[0, 19:24], packed_losses[0, 19:24], **tol)


# ----- epochs, weights, sharding -----

def make_plan(lengths, weights=None, packing=False, seed=3, global_batch=8, n_files=2):
    lengths = np.asarray(lengths)
    split = np.array_split(np.arange(len(lengths)), n_files)
    return EpochPlan(lengths, split, weights, seed, 64, packing, global_batch)


@pytest.mark.parametrize("packing", [False, True])
def test_every_sample_once_per_epoch_across_replicas(packing):
    lengths = np.random.default_rng(0).integers(2, 40, size=101)
    plan = make_plan(lengths, packing=packing)
    schedule = Schedule(plan, n_epochs=3)
    replicas = 2
    for epoch in range(3):
        seen = []
        for index in range(plan.steps(epoch)):
            rows = plan.batch(epoch, index)
            assert len(rows) == 8
            for r in range(replicas):
                block = rows[r * 4:(r + 1) * 4]  # replica r's contiguous block of the global batch
                seen += [int(s) for row in block if row is not None for s in row]
        assert sorted(seen) == list(range(101)), epoch
    assert schedule.total_steps == sum(plan.steps(e) for e in range(3))
    assert schedule.locate(plan.steps(0)) == (1, 0)


def test_shuffle_is_deterministic_and_changes_per_epoch():
    lengths = np.full(64, 10)
    a, b, c = make_plan(lengths), make_plan(lengths), make_plan(lengths, seed=4)
    assert np.array_equal(a.rows(0)[1], b.rows(0)[1])
    assert not np.array_equal(a.rows(0)[1], a.rows(1)[1])
    assert not np.array_equal(a.rows(0)[1], c.rows(0)[1])


def test_weights_repeat_and_subsample():
    lengths = np.full(100, 10)
    plan = make_plan(lengths, weights=[2.0, 0.5])  # file 0: samples 0-49, file 1: 50-99
    epoch0, epoch1 = plan.samples(0), plan.samples(1)
    counts = np.bincount(epoch0, minlength=100)
    assert (counts[:50] == 2).all() and (counts[50:] <= 1).all() and counts[50:].sum() == 25
    assert set(epoch0[epoch0 >= 50].tolist()) != set(epoch1[epoch1 >= 50].tolist())  # a fresh half each epoch
    assert plan.num_rows(0) == 125


def test_eval_split_is_seeded_and_disjoint():
    store = SimpleNamespace(files=[0, 0], file_ids=lambda i: np.arange(i * 50, (i + 1) * 50))
    train, held = split_eval(store, 0.1, seed=5)
    assert len(held) == 10 and sum(len(t) for t in train) == 90
    assert not set(held.tolist()) & set(np.concatenate(train).tolist())
    assert np.array_equal(split_eval(store, 0.1, seed=5)[1], held)


def test_materialize_rows(tmp_path, tok):
    entry = tokenize_file(EXAMPLES[0], tok, DataOptions(128), cache_dir=tmp_path)
    store = SampleStore([entry])
    ids, labels, positions, lengths = materialize(store, [np.array([0, 1]), None], 256, pad_id=3)
    n0, n1 = len(entry.sample(0)[0]), len(entry.sample(1)[0])
    assert lengths.tolist() == [n0 + n1, 0]
    assert positions[0, :n0].tolist() == list(range(n0)) and positions[0, n0:n0 + n1].tolist() == list(range(n1))
    assert ids[0, :n0].tolist() == entry.sample(0)[0].tolist()
    assert (ids[0, n0 + n1:] == 3).all() and (labels[0, n0 + n1:] == IGNORE_INDEX).all() and (labels[1] == IGNORE_INDEX).all()
    assert labels[0, n0] == IGNORE_INDEX  # the first token of the second sample


# ----- cache -----

def test_cache_reused_and_invalidated(tmp_path, tok, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text(Path(EXAMPLES[0]).read_text(encoding="utf-8"), encoding="utf-8")
    cache = tmp_path / "cache"
    first = tokenize_file(data, tok, DataOptions(64), cache_dir=cache)
    built = []
    original = data_module._build_entry
    monkeypatch.setattr(data_module, "_build_entry", lambda *a, **k: (built.append(a[0]), original(*a, **k)))
    again = tokenize_file(data, tok, DataOptions(64), cache_dir=cache)
    assert built == [] and np.array_equal(again.tokens, first.tokens) and again.meta == first.meta
    keys = {p.name for p in cache.iterdir() if p.is_dir()}
    tokenize_file(data, tok, DataOptions(32), cache_dir=cache)  # max_seq_len
    tokenize_file(data, tok, DataOptions(64, overlong="drop"), cache_dir=cache)
    tokenize_file(data, tok, DataOptions(64, skip_bad_records=True), cache_dir=cache)
    chat = AutoTokenizer.from_pretrained(MODEL_DIR)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenize_file(data, chat, DataOptions(64, template="builtin"), cache_dir=cache)  # tokenizer
    tokenize_file(data, chat, DataOptions(64), cache_dir=cache)  # template
    with data.open("a", encoding="utf-8") as f:  # content
        f.write(json.dumps({"type": "pretrain", "text": "one more"}) + "\n")
    grown = tokenize_file(data, tok, DataOptions(64), cache_dir=cache)
    assert len(built) == 6 and len(grown) == len(first) + 1
    assert len({p.name for p in cache.iterdir() if p.is_dir()} - keys) == 6


def _open_in_process(args):
    data, cache = args
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    entry = tokenize_file(data, tok, DataOptions(256), cache_dir=cache, num_workers=1)
    return entry.tokens.tolist(), entry.meta["seconds"]


def test_ranks_share_one_cache_entry(tmp_path):
    data = EXAMPLES[3]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_open_in_process, [(data, str(tmp_path))] * 2)
    assert results[0] == results[1]  # same tokens, and the same meta: built once, opened twice
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_worker_processes_tokenize_like_one_process(tmp_path, tok, monkeypatch):
    lines = []
    for i in range(3000):
        lines.append(json.dumps({"type": "conversation", "rounds": [["ask", f"what is {i}?"], ["ans", f"{i}"]]}))
    lines[1234] = '{"type": "instruct"}'
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(data_module, "PARALLEL_MIN_BYTES", 0)
    options = DataOptions(64, skip_bad_records=True)
    serial = tokenize_file(data, tok, options, cache_dir=tmp_path / "a", num_workers=1)
    parallel = tokenize_file(data, tok, options, cache_dir=tmp_path / "b", num_workers=2)
    assert np.array_equal(serial.tokens, parallel.tokens) and np.array_equal(serial.offsets, parallel.offsets)
    assert np.array_equal(serial.trained, parallel.trained)
    assert parallel.meta["bad_records"] == {"missing_field": 1} and parallel.meta["records"] == 3000
    with pytest.raises(PipellmError, match=r"big.jsonl line 1235: field \"instruct\": missing"):
        tokenize_file(data, tok, DataOptions(64), cache_dir=tmp_path / "c", num_workers=2)


def test_load_training_data_from_config(tmp_path, tok):
    cfg = SimpleNamespace(max_seq_len=128, template="auto", overlong="truncate", skip_bad_records=False,
                          data_cache_dir=str(tmp_path), tokenize_workers=1, data_paths=EXAMPLES, eval_data_paths=[],
                          eval_ratio=0.2, seed=1, data_weights=None, packing=True, global_batch_size=4)
    data = load_training_data(cfg, tok, show_progress=False)
    n = sum(len(f) for f in data.store.files)
    assert n == 15 and len(data.eval_rows) >= 1
    summary = data.summary()
    assert "15 records in 5 file(s)" in summary and "(packed)" in summary and "fill ratio" in summary
    batches = [data.rows_of(rows, data.eval_store) for rows in data.eval_row_batches(4)]
    assert all(b[0].shape == (4, 128) for b in batches)
