"""rf-megatron: value residual learning (ResFormer / SVFormer) on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="rf-megatron",
    version="0.1.0",
    description="Value residual learning (ResFormer/SVFormer) for Megatron-Core pretraining at scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rf_megatron", "rf_megatron.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        # Tested: 0.16.1 (Python 3.11) and 0.19.2 (Python >= 3.12 clusters; on 3.11 see .ci/run).
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "pyyaml",
        "psutil",  # dist_checkpointing saves hang without it
        "sentencepiece",
    ],
    extras_require={
        "logging": ["wandb", "tensorboard"],
        "hf": ["transformers>=5,<6", "safetensors", "protobuf"],
        "scaling": ["scipy", "pandas", "matplotlib", "pyarrow"],
        # pretrain/pretrain_hf_deepspeed.py (tested with 0.19.8; CPU accelerator + gloo, or CUDA + NCCL)
        "deepspeed": ["deepspeed>=0.16", "transformers>=5,<6", "safetensors", "protobuf"],
        "dev": ["pytest>=8", "pytest-timeout", "wandb", "transformers>=5,<6", "safetensors", "scipy", "pandas",
                "matplotlib", "pyarrow", "deepspeed>=0.16"],
        "gpu": ["transformer-engine[pytorch]"],
    },
)
