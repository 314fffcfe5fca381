import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_pp_model(tmp_path_factory):
    """The embedded tiny llama, randomly initialised, as a Hugging Face dir and as pipeline layer files."""
    from pipellm.convert.converters import hg_to_pp
    from pipellm.quickstart import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    hf_dir = make_tiny_model(root / "hf")
    return hf_dir, hg_to_pp(hf_dir, root / "pp")


@pytest.fixture(scope="session")
def launcher_run_2x1(tmp_path_factory, tiny_pp_model):
    """The deepspeed launcher's run of the scale-out config on 2 stages (``tests/launches.py``): its save
    directory. One run for the session: the scale-out and Ray tests compare their launches with it."""
    from launches import run_launcher_2x1

    return run_launcher_2x1(tmp_path_factory.mktemp("launcher_2x1"), tiny_pp_model[1])


@pytest.fixture(scope="session")
def tied_pp_model(tmp_path_factory) -> Path:
    """The tiny llama with its head tied to the embedding, as pipeline layer files (no head file): on 2 stages
    the last one holds a pipeline-replicated copy of the embedding."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipellm.convert.converters import hg_to_pp
    from pipellm.data.tokenizer import load_tokenizer
    from pipellm.quickstart import TINY_LLAMA

    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA, tie_word_embeddings=True))
    model.save_pretrained(root / "hf")
    load_tokenizer(TINY_LLAMA).save_pretrained(root / "hf")
    return hg_to_pp(root / "hf", root / "pp")
