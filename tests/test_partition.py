"""``pipellm.pipeline.partition``: the user's ``parts``, DeepSpeed's layers and boundaries, and the layer files
count one model's layers consistently (the final norm + head are one user layer, two DeepSpeed layers on the last
stage; a tied head has no layer file, its weights are file 0's)."""
from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from pipellm.errors import PipellmError
from pipellm.models import load_model_config
from pipellm.pipeline.partition import Partition, PipelineLayers, parameter_costs

TINY = Path(__file__).resolve().parent.parent / "pipellm" / "assets" / "tiny_llama"  # 4 decoder layers


@pytest.fixture
def tiny():
    return load_model_config(TINY)


@pytest.mark.parametrize("tied", [False, True])
def test_counts_of_a_model(tiny, tied):
    hf_config, family = tiny
    hf_config.tie_word_embeddings = tied
    layers = PipelineLayers.of(family, hf_config)
    assert (layers.num_decoders, layers.tied) == (4, tied)
    assert (layers.num_user_layers, layers.num_deepspeed_layers) == (6, 7)
    assert layers.num_files == (6 if tied else 7)


def test_kinds_and_indices_round_trip():
    layers = PipelineLayers(num_decoders=3, tied=False)
    kinds = [layers.kind(index) for index in range(layers.num_deepspeed_layers)]
    assert kinds == [("embed", None), ("decoder", 0), ("decoder", 1), ("decoder", 2), ("norm", None), ("head", None)]
    assert [layers.index(kind, decoder_index) for kind, decoder_index in kinds] == list(range(6))
    for outside in (-1, 6):
        with pytest.raises(IndexError):
            layers.kind(outside)


@pytest.mark.parametrize("tied", [False, True])
def test_layer_file_of_each_deepspeed_layer(tied):
    layers = PipelineLayers(num_decoders=4, tied=tied)
    files = [layers.file_index(index) for index in range(layers.num_deepspeed_layers)]
    assert files == ([0, 1, 2, 3, 4, 5, 0] if tied else list(range(7)))
    assert sorted(set(files)) == list(range(layers.num_files))  # every file is used, none beyond
    # A layer file holds the weights of the layer of its own index (a tied head's file is the embedding's).
    assert layers.kind(layers.file_index(layers.index("head"))) == (("embed", None) if tied else ("head", None))


def test_parts_boundaries_and_counts_round_trip():
    rng = random.Random(12)
    for _ in range(200):
        layers = PipelineLayers(num_decoders=rng.randint(0, 12), tied=rng.random() < 0.5)
        num_stages = rng.randint(1, layers.num_user_layers)
        cuts = sorted(rng.sample(range(1, layers.num_user_layers), num_stages - 1))
        user = [0, *cuts, layers.num_user_layers]
        counts = tuple(b - a for a, b in zip(user, user[1:]))
        partition = Partition(layers, counts)
        assert partition.user_boundaries == user
        # DeepSpeed's: the same, but the last stage also holds the extra layer (norm and head are two).
        assert partition.boundaries == user[:-1] + [layers.num_deepspeed_layers]
        assert Partition.of_boundaries(layers, partition.boundaries) == partition
        assert partition.parts == list(counts)
        last_stage = range(partition.boundaries[-2], partition.boundaries[-1])
        assert {layers.kind(i)[0] for i in last_stage} >= {"norm", "head"}


def test_named_parts(tiny):
    hf_config, family = tiny
    uniform = {stages: Partition.of_parts("uniform", family, hf_config, stages).parts for stages in (1, 2, 3, 4)}
    assert uniform == {1: [6], 2: [3, 3], 3: [2, 2, 2], 4: [2, 2, 1, 1]}
    assert Partition.of_parts("uniform", family, hf_config, 2).boundaries == [0, 3, 7]
    embed, decoder = 1017 * 64, 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 172 + 2 * 64
    assert parameter_costs(family, hf_config) == [embed] + [decoder] * 4 + [embed]
    by_parameters = Partition.of_parts("parameters", family, hf_config, 2)
    assert by_parameters.parts == [3, 3] and all(type(count) is int for count in by_parameters.counts)
    assert all(type(b) is int for b in by_parameters.boundaries)  # the run record holds them as JSON
    assert Partition.of_parts([1, 5], family, hf_config, 2).boundaries == [0, 1, 7]
    with pytest.raises(ValueError, match="auto"):
        Partition.of_parts("auto", family, hf_config, 2)


def test_parts_that_do_not_fit_the_model(tiny):
    hf_config, family = tiny
    layers = PipelineLayers.of(family, hf_config)
    for parts, stages in itertools.product(("uniform", "parameters", "auto", [3, 3]), (1, 2, 6)):
        layers.check_parts(parts, stages)
    with pytest.raises(PipellmError) as error:
        layers.check_parts([2, 2], 2)
    assert str(error.value) == ("`model_topo.parts` [2, 2] sums to 4 but the model has 6 pipeline layers "
                                "(embedding + 4 decoder layers + head)")
    with pytest.raises(PipellmError, match="^the model has 6 pipeline layers, fewer than the 7 stages$"):
        layers.check_parts("uniform", 7)
    with pytest.raises(PipellmError, match="sums to 7"):
        Partition.of_parts([3, 4], family, hf_config, 2)


def test_user_layer_names():
    layers = PipelineLayers(num_decoders=4, tied=False)
    assert layers.user_layer_names(0, 3) == "0-2: embed + decoders 0-1"
    assert layers.user_layer_names(3, 6) == "3-5: decoders 2-3 + head"
    assert layers.user_layer_names(0, 6) == "0-5: embed + decoders 0-3 + head"
    assert layers.user_layer_names(1, 2) == "1: decoder 0"
    assert layers.user_layer_names(5, 6) == "5: head"
    assert layers.user_layer_names(0, 1) == "0: embed"
