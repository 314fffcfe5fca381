"""``python -m pipellm.ray --config X.yml [--address auto] [--num-workers N] [--gpus-per-worker 1]``."""
from pipellm.ray.launch import main

main()
