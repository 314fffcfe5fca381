"""DPO against supervised fine-tuning on the same rows: tokens/s of each, and the time of DPO's reference pass.

    python benchmarks/dpo_vs_sft.py --preset 7b-16 --seq 2048 --micro 2 --global-batch 16 --stages 1 --flash
    python benchmarks/dpo_vs_sft.py --smoke        # CPU, tiny model, 2 steps: the machinery only

Writes a random-init llama of the preset's shape (no download) and synthetic preference pairs whose answers fill
each row (every sample is at least ``--seq`` tokens, truncated to it: no padding), the same samples as
``conversation`` records for SFT (chosen then rejected, one sample per row: the same rows, the same tokens
computed), trains each with ``train_ds.py`` (``from_scratch``, ``objective: dpo`` with ``reference: initial``
vs the default objective), and reports the medians over the steps after the warm-up ones
(``benchmarks/harness.py``). DPO's extra work is its reference pass before step 1 (one forward over the
epoch's rows, read from the log line ``reference log-probs ... computed in S s``) and a per-token log-prob in
place of the cross entropy. Appends one CSV row per run to ``--csv``.

MFU = tokens/s/GPU x (6 x (N - N_embedding) + 12 x L x d x S) / peak FLOP/s (``pipellm.observe.metrics``); the
tokens are the rows' non-pad tokens, the same for both objectives.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import tempfile
from pathlib import Path

import harness

REFERENCE_LINE = re.compile(r"reference log-probs of (\d+) samples computed in ([0-9.]+)s")


def write_pairs(work: Path, pairs: int, seq: int) -> tuple[Path, Path]:
    """``pairs`` preference records (prompt + answers of ``seq`` words each) and the same samples as SFT
    conversations, chosen then rejected."""
    rng = random.Random(0)
    dpo, sft = work / "pairs.jsonl", work / "sft.jsonl"
    with open(dpo, "w") as pair_file, open(sft, "w") as sft_file:
        for _ in range(pairs):
            ask = " ".join(rng.choices(harness.WORDS, k=4))
            answers = [" ".join(rng.choices(harness.WORDS, k=seq)) for _ in range(2)]
            pair_file.write(json.dumps({"type": "preference", "rounds": [["ask", ask]], "chosen": answers[0],
                                        "rejected": answers[1]}) + "\n")
            for answer in answers:
                sft_file.write(json.dumps({"type": "conversation", "rounds": [["ask", ask], ["ans", answer]]}) + "\n")
    return dpo, sft


def point_keys(objective: str) -> dict:
    """The YAML keys of one objective's run over the harness point's own."""
    return {"objective": objective, "template": "builtin", "n_epochs": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=harness.PRESETS, default="7b-16")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the preset's; fewer to fit full fine-tuning on an 80 GB GPU)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2, help="micro batch size per GPU (even: a pair's two rows)")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--flash", action="store_true", help="use_flash_attn")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the machinery: tiny model, 2 steps")
    parser.add_argument("--csv", default=str(harness.REPO / "benchmarks" / "results" / "dpo_vs_sft.csv"))
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.seq, args.micro, args.global_batch, args.stages = "tiny", 64, 2, 4, 1
        args.steps, args.warmup = 3, 1

    work = Path(tempfile.mkdtemp(prefix="pipellm-dpo-bench-"))
    model_dir = harness.write_model(work, args.preset, args.layers)
    pairs_file, sft_file = write_pairs(work, args.global_batch * args.steps // 2, args.seq)
    rows = []
    for objective, data in (("dpo", pairs_file), ("token_mean", sft_file)):
        point = harness.Point("pipeline", args.seq, args.global_batch, args.micro, args.stages, args.steps,
                              parts="uniform", flash=args.flash, dtype="fp32" if args.smoke else "bf16",
                              extra=point_keys(objective))
        outcome = harness.launch(point, model_dir, data, work / objective, args.warmup, echo=not args.smoke)
        if outcome.status != "ok":
            print(f"FAILED ({outcome.status}: {outcome.reason}): {objective}; log {outcome.log}")
            sys.exit(1)
        reference = REFERENCE_LINE.search(outcome.log.read_text()) if objective == "dpo" else None
        rows.append({"objective": objective, "preset": args.preset, "layers": args.layers or
                     harness.PRESETS[args.preset][2], "seq": args.seq, "micro": args.micro,
                     "global_batch": args.global_batch, "stages": args.stages,
                     "timed_steps": outcome.figures["timed_steps"],
                     "tokens_per_sec_per_gpu": outcome.figures["tokens_per_sec_per_gpu"],
                     "mfu": outcome.figures["mfu"], "step_time_s": outcome.figures["step_time_s"],
                     "peak_mem_gib_per_gpu": outcome.figures["peak_mem_gib_per_gpu"],
                     "reference_pass_s": float(reference.group(2)) if reference else None,
                     "device": harness.gpu_name() or "cpu"})
    dpo, sft = rows
    print("RESULT " + json.dumps({"dpo_tokens_per_sec_per_gpu": dpo["tokens_per_sec_per_gpu"],
                                  "sft_tokens_per_sec_per_gpu": sft["tokens_per_sec_per_gpu"],
                                  "dpo_over_sft": dpo["tokens_per_sec_per_gpu"] / sft["tokens_per_sec_per_gpu"],
                                  "reference_pass_s": dpo["reference_pass_s"]}))
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
