"""A model family as DeepSpeed pipeline stages: wrappers, partition, weights, loss, schedule, and the one module
that touches DeepSpeed's private members (``deepspeed_compat``)."""
