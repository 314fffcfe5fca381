#!/usr/bin/env python
"""ZeRO-3 baseline: ``deepspeed [--num_gpus N | --hostfile H] train_ds_zero.py --config configs/ds_config_zero.yml``.

The logic lives in ``pipellm.training.zero``.
"""
from pipellm.training.distributed import run_as_process
from pipellm.training.zero import main

if __name__ == "__main__":
    run_as_process(main)  # ends the process without finalizing Python (see there)
