"""FlexAttention with a document block mask (``attention_backend: flex``) keeps every family's attention to each
packed sample: a packed row's per-token losses equal those of its samples run alone (SDPA, no mask), and the
whole row's logits equal SDPA's with the dense sample mask; ALiBi (bloom, baichuan2-13b) as a score_mod equals
the dense ALiBi mask on unpacked rows too. CPU runs FlexAttention's reference implementation, forward only."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import LlamaConfig

from pipellm.config import load_config
from pipellm.data import IGNORE_INDEX
from pipellm.data.batches import micro_batches
from pipellm.errors import PipellmError
from pipellm.models import load_model_config
from pipellm.models.attention import AttentionOptions
from pipellm.models.flex_attention import check_attention_backend
from pipellm.pipeline.loss import token_mean_loss
from pipellm.pipeline.stages import layer_specs

VOCAB, SEQ = 97, 40
# Head dims of 16: the smallest FlexAttention's GPU kernels take.
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 48, "num_attention_heads": 4,
         "num_hidden_layers": 2, "tie_word_embeddings": False, "initializer_range": 0.2}
BAICHUAN = {"model_type": "baichuan", **SMALL, "hidden_act": "silu", "rms_norm_eps": 1e-6, "model_max_length": 64}
CONFIGS = {  # config.json of each family, tiny; weights 10x the usual init so attention is far from uniform
    "llama": {"model_type": "llama", **SMALL, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "mixtral": {"model_type": "mixtral", **SMALL, "num_key_value_heads": 2, "max_position_embeddings": 64,
                "num_local_experts": 4, "num_experts_per_tok": 2},
    "baichuan2-7b": {**BAICHUAN, "pipellm_position_embedding": "rope"},
    "baichuan2-13b": {**BAICHUAN, "pipellm_position_embedding": "alibi"},
    "bloom": {"model_type": "bloom", "vocab_size": VOCAB, "hidden_size": 80, "n_layer": 2, "n_head": 5,
              "tie_word_embeddings": False, "initializer_range": 0.2},
    "chatglm": {"model_type": "chatglm", "num_layers": 2, "padded_vocab_size": VOCAB, "hidden_size": 64,
                "ffn_hidden_size": 48, "kv_channels": 16, "num_attention_heads": 4, "multi_query_attention": True,
                "multi_query_group_num": 2, "add_qkv_bias": True, "add_bias_linear": False,
                "layernorm_epsilon": 1e-5, "rmsnorm": True, "post_layer_norm": True, "original_rope": True,
                "rope_ratio": 3, "seq_length": 64, "tie_word_embeddings": False},
}


def build_layers(family, config, options: AttentionOptions, state=None):
    layers = [spec.build() for spec in layer_specs(family, config, use_grad_ckpt=False, attention=options)]
    model = torch.nn.ModuleList(layers)
    if state is None:
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
    else:
        model.load_state_dict(state)
    return model.eval()


def rows(samples_per_row):
    """``(input_ids, labels, position_ids)`` of right-padded rows, each holding the given samples in order."""
    ids = torch.zeros(len(samples_per_row), SEQ, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions = torch.arange(SEQ).repeat(len(samples_per_row), 1)
    for r, samples in enumerate(samples_per_row):
        at = 0
        for s in samples:
            ids[r, at:at + len(s)], labels[r, at + 1:at + len(s)] = s, s[1:]
            positions[r, at:at + len(s)] = torch.arange(len(s))
            at += len(s)
        positions[r, at:] = positions[r, at - 1] + 1 + torch.arange(SEQ - at)
    return ids, labels, positions


def run(model, ids, labels, positions):
    """Per-token losses ``[rows, SEQ]`` (0 where no target) and the logits."""
    (inputs, (targets, _)), = micro_batches(ids, labels, len(ids), 0, 1, positions)
    hidden = inputs
    with torch.no_grad():
        for layer in model:
            hidden = layer(hidden)
    logits = hidden.logits.float()
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                               reduction="none").view(targets.shape)
    return losses, logits


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_flex_packed_rows_equal_samples_alone(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    config, family = load_model_config(tmp_path)
    flex = build_layers(family, config, AttentionOptions(packed=True, backend="flex"))
    state = flex.state_dict()
    alone_model = build_layers(family, config, AttentionOptions(backend="sdpa"), state)
    dense_mask = build_layers(family, config, AttentionOptions(packed=True, backend="sdpa"), state)
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(4, VOCAB, (n,), generator=gen) for n in (9, 14, 6, 5)]

    packed_losses, packed_logits = run(flex, *rows([samples]))
    alone_losses, _ = run(alone_model, *rows([[s] for s in samples]))
    at = 0
    for i, s in enumerate(samples):
        torch.testing.assert_close(packed_losses[0, at:at + len(s)], alone_losses[i, :len(s)], rtol=1e-5, atol=1e-5)
        at += len(s)
    assert packed_losses[0, :at].count_nonzero() == at - len(samples)  # every target scored, none across samples
    # The whole row, padding included, as SDPA computes it with the dense sample mask.
    torch.testing.assert_close(packed_logits, run(dense_mask, *rows([samples]))[1], rtol=1e-5, atol=1e-5)
    # Unpacked rows (ALiBi's score_mod against the dense ALiBi mask; rotary families take SDPA's causal path).
    unpacked_flex = build_layers(family, config, AttentionOptions(backend="flex"), state)
    torch.testing.assert_close(run(unpacked_flex, *rows([[s] for s in samples]))[1],
                               run(alone_model, *rows([[s] for s in samples]))[1], rtol=1e-5, atol=1e-5)


def test_flex_backend_is_refused_for_training_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the refusal is a CPU one: FlexAttention trains on GPUs (its gradients: the GPU test below)")
    LlamaConfig(**CONFIGS["llama"]).save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text('{"type": "pretrain", "text": "hello"}\n')
    path = tmp_path / "c.yml"
    path.write_text(f"model_path: {tmp_path / 'model'}\nsave_path: {tmp_path / 'save'}\ndata_path: "
                    f"{tmp_path / 'data.jsonl'}\nattention_backend: flex\ntrain_batch_size: 2\n"
                    f"train_micro_batch_size_per_gpu: 1\n")
    cfg = load_config(path)
    with pytest.raises(PipellmError, match=r"c\.yml: `attention_backend: flex`: torch's FlexAttention has no "
                                           r"backward on CPU; use `auto`"):
        check_attention_backend(cfg)
    path.write_text(path.read_text().replace("flex", "flexx"))
    with pytest.raises(PipellmError, match="attention_backend"):
        load_config(path)


GPU_CASES = [(name, compiled) for name in ("llama", "bloom", "chatglm") for compiled in (False, True)] \
    if torch.cuda.is_available() else []


@pytest.mark.parametrize("name, compiled", GPU_CASES)
def test_flex_gradients_equal_dense_mask_on_gpu(name, compiled, tmp_path):
    """GPU only (FlexAttention's backward): loss and every parameter gradient of a packed micro batch equal those
    of SDPA with the dense sample mask, eager and compiled layers, fp32."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    config, family = load_model_config(tmp_path)
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(4, VOCAB, (n,), generator=gen) for n in (9, 14, 6, 5)]
    batch = rows([samples, samples[::-1]])
    results = []
    for backend in ("flex", "sdpa"):
        specs = layer_specs(family, config, use_grad_ckpt=False, compile_layers=compiled,
                            attention=AttentionOptions(packed=True, backend=backend))
        with torch.device("cuda"):
            model = torch.nn.ModuleList([spec.build() for spec in specs])
        if results:
            model.load_state_dict(results[0][2])
        else:
            torch.manual_seed(0)
            for p in model.parameters():
                torch.nn.init.normal_(p, std=0.2)
        (inputs, labels), = micro_batches(*(t.cuda() for t in batch[:2]), 2, 0, 1, batch[2].cuda())
        hidden = inputs
        for layer in model[:-1]:
            hidden = layer(hidden)
        loss = token_mean_loss(model[-1](hidden), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    (flex_loss, flex_grads, _), (dense_loss, dense_grads, _) = results
    torch.testing.assert_close(flex_loss, dense_loss, rtol=1e-5, atol=1e-5)
    for key, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)


def test_block_mask_equals_torch_create_block_mask():
    """The block-level document mask (no dense seq x seq mask) has the blocks and the per-element mask torch's
    ``create_block_mask`` derives from the dense one: packed rows (samples crossing block edges, a padded tail,
    an empty row) and causal rows, a length that is not a multiple of the block."""
    from torch.nn.attention.flex_attention import create_block_mask

    from pipellm.models.flex_attention import document_block_mask

    seq = 300
    lengths = [[130, 7, 1, 90, 50], [300], [5] * 40, []]
    position_ids = torch.arange(seq).repeat(len(lengths), 1)
    for r, row in enumerate(lengths):
        at = 0
        for n in row:
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        if 0 < at < seq:
            position_ids[r, at:] = position_ids[r, at - 1] + 1 + torch.arange(seq - at)
    for packed in (True, False):
        ours = document_block_mask(position_ids.clone(), packed)
        start = torch.arange(seq) - position_ids if packed else torch.zeros_like(position_ids)
        reference = create_block_mask(lambda b, h, q, k: (k <= q) & (k >= start[b, q]), len(lengths), None, seq,
                                      seq, device="cpu")
        assert torch.equal(ours.to_dense(), reference.to_dense())
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(ours, name), getattr(reference, name)), name
        for name in ("kv_indices", "full_kv_indices"):  # the visible blocks of each row, in the same order
            counts = getattr(ours, name.replace("indices", "num_blocks"))
            for b, q in itertools.product(range(len(lengths)), range(counts.shape[-1])):
                n = int(counts[b, 0, q])
                assert torch.equal(getattr(ours, name)[b, 0, q, :n], getattr(reference, name)[b, 0, q, :n]), name
        assert torch.equal(ours.mask_mod(torch.tensor(0), 0, torch.arange(seq)[:, None], torch.arange(seq)),
                           reference.mask_mod(torch.tensor(0), 0, torch.arange(seq)[:, None], torch.arange(seq)))


def test_auto_backend_is_flex_on_cuda_and_sdpa_on_cpu():
    """``auto`` picks FlexAttention where its gradients are proven (CUDA) and the dense mask where it has no
    backward (CPU); ``flex`` and ``sdpa`` are what they say on either device."""
    from pipellm.models.flex_attention import uses_flex

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [uses_flex(b, cuda) for b in ("auto", "flex", "sdpa")] == [True, True, False]
    assert [uses_flex(b, cpu) for b in ("auto", "flex", "sdpa")] == [False, True, False]
