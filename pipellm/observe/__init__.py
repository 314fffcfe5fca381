"""What a run shows: the metrics log and its sinks (TensorBoard, W&B), the run record, the GPU profile, the step
profile."""
