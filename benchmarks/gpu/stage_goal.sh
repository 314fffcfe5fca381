#!/usr/bin/env bash
# Issue 15's one-stage goal (>= 62% MFU at seq 2048 and 4096) on one GPU, in one command: the llama-7B shape
# with LAYERS decoder layers (16 on an H200, as the issue measures; 12 fit an 80 GB H100 with AdamW), global batch
# 32, bf16, pipellm's defaults (compiled layers), each point a run_pipeline.py launch appending to OUT/runs.csv;
# then guard.py's verdict (the best run of each sequence length). Points in priority order, so a short lease
# still measures the goal's two lengths first.
#   bash benchmarks/gpu/stage_goal.sh OUT [LAYERS]
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu/stage_goal.sh OUT [LAYERS]}
layers=${2:-16}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
point() {
  echo "=== $* ($(date +%T))"
  timeout 300 python3 benchmarks/run_pipeline.py --preset 7b-16 --layers "$layers" --stages 1 --global-batch 32 \
    --steps 6 --warmup 3 --csv "$out/runs.csv" "$@" 2>&1 | tee -a "$out/log.txt" | grep -vi warn | tail -3
  # Runs minutes apart on one H100 differed by 5% (results/stage_goal_h100/): the clocks say whether it throttled.
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader \
    | tee -a "$out/gpu.txt"
}
# The compiled loss paid 0.8 points at 4096 on an H100 and read 4.7% slower at 2048 once, within the 5% that runs
# of one configuration differed by: both lengths try it.
compiled_loss='{"speed": {"loss_kernel": "compiled"}}'
point --seq 2048 --micro 8
point --seq 4096 --micro 4 --yaml-json "$compiled_loss"
point --seq 2048 --micro 8 --yaml-json "$compiled_loss"
point --seq 2048 --micro 2  # the starting point (54.7% on an H200)
point --seq 4096 --micro 4
python3 benchmarks/guard.py --stage-runs "$out/runs.csv"
