"""The whole user journey on the embedded tiny llama, offline, on CPUs or GPUs: ``python -m pipellm.quickstart``.

1. make a randomly initialised tiny llama from ``pipellm/assets/tiny_llama`` (config + tokenizer), as a Hugging
   Face checkpoint;
2. ``convert_model.py hg_to_pp`` it;
3. train it on ``pipellm/assets/data/`` (generated ``sample.jsonl`` plus one example file per record format,
   packed into rows) with ``deepspeed --num_gpus 2 train_ds.py --config
   configs/ds_config_pp.yml`` (two pipeline stages; on a machine without GPUs, two CPU processes);
4. ``convert_model.py pp_to_hg`` the checkpoint, load it with transformers, compare its loss on the data with
   the starting model's, and generate one answer.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pipellm.chat import load_chat
from pipellm.config import load_config
from pipellm.data import IGNORE_INDEX
from pipellm.data.cache import build_dataset
from pipellm.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
TINY_LLAMA = ASSETS / "tiny_llama"


def make_tiny_model(dest: Path, seed: int = 0) -> Path:
    """A randomly initialised Hugging Face checkpoint of the embedded tiny llama, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
    model.save_pretrained(dest)
    load_tokenizer(TINY_LLAMA).save_pretrained(dest)
    return dest


@torch.no_grad()
def mean_token_loss(model_dir: str | Path, data_paths: list[str], max_seq_len: int, template: str = "auto") -> float:
    """Mean cross entropy over every labelled token of the data, for the Hugging Face model in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = build_dataset(data_paths, load_tokenizer(model_dir), max_seq_len, template=template)
    total, count = 0.0, 0
    for start in range(0, len(data), 32):
        rows = slice(start, start + 32)
        attention_mask = torch.arange(max_seq_len) < data.lengths[rows, None]
        logits = model(input_ids=data.input_ids[rows], attention_mask=attention_mask.long()).logits
        targets = data.labels[rows, 1:]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def launch_training(config: str | Path, num_processes: int) -> None:
    """``deepspeed --num_gpus N train_ds.py --config CONFIG`` from the repository root."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_processes),
               "--master_port", str(29500 + os.getpid() % 1000), str(REPO / "train_ds.py"), "--config", str(config)]
    print("+ deepspeed " + " ".join(command[3:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "ds_config_pp.yml"))
    args = parser.parse_args(argv)
    from pipellm.convert.converters import hg_to_pp, pp_to_hg

    cfg = load_config(args.config)
    work = Path(cfg.model_path).parent
    for stale in (work, Path(cfg.save_path)):
        shutil.rmtree(stale, ignore_errors=True)
    hf_init = make_tiny_model(work / "hf_init")
    print(f"1. tiny llama (random init) written to {hf_init}", flush=True)
    hg_to_pp(hf_init, cfg.model_path)
    print(f"2. converted to pipeline layers in {cfg.model_path}", flush=True)
    launch_training(args.config, cfg.pipe_degree * cfg.data_degree)
    hf_trained = pp_to_hg(cfg.save_path, work / "hf_trained")
    print(f"3. trained checkpoint exported to {hf_trained}", flush=True)
    before = mean_token_loss(hf_init, cfg.data_paths, cfg.max_seq_len, cfg.template)
    after = mean_token_loss(hf_trained, cfg.data_paths, cfg.max_seq_len, cfg.template)
    print(f"4. loss on the training data: {before:.3f} before, {after:.3f} after training")
    question = "What is 3 plus 4?"
    print(f"   sample ({cfg.template} template): {question!r} -> "
          f"{load_chat(hf_trained, cfg.template, max_new_tokens=32).reply(question, stream=False)!r}")


if __name__ == "__main__":
    main()
