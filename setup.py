"""pipellm: train and fine-tune large language models with DeepSpeed pipeline parallelism.

Install torch first (`pip install torch==<version>` of the build you want), then
`pip install --no-build-isolation -e '.[test]'` (DeepSpeed builds against the installed torch).
"""
from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "pipellm" / "__init__.py").read_text(), version)

setup(
    name="pipellm",
    version=version["__version__"],
    description="Train and fine-tune LLMs with DeepSpeed pipeline parallelism",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipellm", "pipellm.*"]),
    package_data={"pipellm": ["assets/tiny_llama/*", "assets/data/*"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",  # pipellm.pipeline.deepspeed_compat: the releases the tests cover
        "transformers>=5,<6",
        "peft>=0.14",  # LoRA / QLoRA adapters (pipellm.training.lora): peft's own layers, not a copy
        "sentencepiece",
        "protobuf",
        "psutil",  # the run lock tells a live holder from a reused pid (pipellm.training.run_lock)
        "tokenizers",
        "pyyaml",
        "safetensors",
        "lion-pytorch",
        "tqdm",
        "tensorboard",  # torch.utils.tensorboard's writer (use_tensorboard)
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "test": ["pytest>=8", "pyflakes", "matplotlib",  # the benchmark smoke test draws its plot
                 "ray>=2.40"],  # tests/test_ray.py
        "plot": ["matplotlib"],
        "nvml": ["nvidia-ml-py"],  # the GPU profile's sampler (pipellm.observe.gpu_profile)
        "ray": ["ray>=2.40"],  # python -m pipellm.ray (plain ray: the dashboard's extras are not needed)
        "liger": ["liger-kernel>=0.8.5"],  # speed.liger_kernels, speed.loss_kernel: liger (CUDA Triton kernels)
    },
)
