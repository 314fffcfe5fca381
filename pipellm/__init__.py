"""pipellm: train and fine-tune large language models with DeepSpeed pipeline parallelism."""
__version__ = "0.1.0"
