"""Training on a Ray cluster (KubeRay included) without ssh or a hostfile: ``python -m pipellm.ray --config X.yml``.

Plain Ray actors, not Ray Train's ``TorchTrainer``: each actor starts the very process the deepspeed launcher
starts (``train_ds.py``'s ``main`` with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` and ``--local_rank`` as the launcher sets them), so DeepSpeed initialises its own process group
and pipellm keeps its checkpoints, ``resume: auto``, metrics, run lock, stall watchdog and exit codes unchanged.
``TorchTrainer`` would start its own torch process group, run the loop inside its workers and manage
checkpoints and restarts its own way: a second training path to keep equal to the first.

``launch`` is the driver (checks, placement, streaming, exit code); ``worker`` the actor that runs one rank.
Ray is an extra: ``pip install 'pipellm[ray]'``.
"""
