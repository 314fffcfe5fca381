"""The training loop shared by both engines (``trainer``), the engines (pipeline, ZeRO-3), the components that
decide for themselves (cadence, checkpointer, early stopping, preemption) and the extension points (objective,
parameter set, schedule)."""
