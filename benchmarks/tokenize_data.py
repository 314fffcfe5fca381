"""Tokenization throughput of the data layer: records/s to build the on-disk cache, and the time to reopen it.

    python benchmarks/tokenize_data.py                       # 1M mixed records, the embedded tiny tokenizer
    python benchmarks/tokenize_data.py --records 200000 --tokenizer /models/llama-7b-pp

Writes a synthetic JSONL file (the five record formats in equal shares, English and Chinese text, ~300
characters a record) to a temporary directory, tokenizes it into a fresh cache with ``tokenize_file`` (worker
processes, as training does) and prints one line: records, seconds, records/s, tokens/s, the samples' total
tokens, then the seconds to open the cached result (what every later run and every other rank pays).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SENTENCES = ["The cat sat on the warm mat and watched the rain.", "Pipelines move activations from stage to stage.",
             "What is the capital of France? It is Paris.", "Water boils at one hundred degrees.",
             "今天天气很好，我们去公园散步吧。", "流水线并行把模型切成几段放在不同的显卡上。"]


def make_record(rng: random.Random, i: int) -> dict:
    def text(n):
        return " ".join(rng.choice(SENTENCES) for _ in range(n))

    kind = i % 5
    if kind == 0:
        return {"type": "pretrain", "text": text(6)}
    if kind == 1:
        record = {"type": "instruct", "instruct": text(2), "output": text(3)}
        if i % 2:
            record["input"] = text(1)
        return record
    rounds = [["ask", text(1)], ["ans", text(2)], ["ask", text(1)], ["ans", text(1)]]
    if kind == 2:
        return {"type": "conversation", "rounds": rounds}
    if kind == 3:
        action = {"inner_thought": text(1), "api_name": "search", "api_param": {"q": str(i)}, "api_res": text(1)}
        return {"type": "conver_has_api", "api_desc": "search: find text.\nParameters: {\"q\": \"string\"}",
                "rounds": rounds[:2] + [["ask", text(1)], ["ans-api", {"actions": [action], "ans": text(1)}]]}
    return {"type": "ref_qa", "reference": text(3), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--tokenizer", default=str(REPO / "pipellm" / "assets" / "tiny_llama"))
    parser.add_argument("--template", default="auto")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: the cores, <= 8)")
    args = parser.parse_args()

    from pipellm.data.cache import DataOptions, tokenize_file
    from pipellm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        rng = random.Random(0)
        with data.open("w", encoding="utf-8") as f:
            for i in range(args.records):
                f.write(json.dumps(make_record(rng, i), ensure_ascii=False) + "\n")
        options = DataOptions(args.max_seq_len, args.template)
        start = time.perf_counter()
        entry = tokenize_file(data, tokenizer, options, cache_dir=Path(tmp) / "cache", num_workers=args.workers)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        reopened = tokenize_file(data, tokenizer, options, cache_dir=Path(tmp) / "cache")
        reopen = time.perf_counter() - start
        assert len(reopened) == len(entry)
        meta = entry.meta
        print(f"records {meta['records']} | {data.stat().st_size / 2**20:.0f} MiB | {seconds:.1f} s | "
              f"{meta['records'] / seconds:,.0f} records/s | {meta['tokens'] / seconds:,.0f} tokens/s | "
              f"tokens {meta['tokens']:,} (trained {meta['trained_tokens']:,}) | truncated {meta['truncated']} | "
              f"workers {args.workers or min(len(os.sched_getaffinity(0)), 8)} | cores {os.cpu_count()} | "
              f"reopen cached {reopen:.2f} s")


if __name__ == "__main__":
    main()
