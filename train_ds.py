#!/usr/bin/env python
"""Pipeline-parallel training: ``deepspeed [--num_gpus N | --hostfile H] train_ds.py --config configs/ds_config_pp.yml``.

The logic lives in ``pipellm.training.train``.
"""
from pipellm.training.distributed import run_as_process
from pipellm.training.train import main

if __name__ == "__main__":
    run_as_process(main)  # ends the process without finalizing Python (see there)
