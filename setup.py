"""rf-megatron: value residual learning (ResFormer / SVFormer) on Megatron-Core."""
from setuptools import find_packages, setup

LOGGING = ["wandb>=0.19,<0.32", "tensorboard>=2.15,<2.22"]  # tested: wandb 0.31.0, tensorboard 2.21.0
# transformers: tested 5.10.4 (oldest; the cache argument was still `past_key_values`) and 5.24.0 (`cache`)
HF = ["transformers>=5.10,<5.25", "safetensors<0.9", "protobuf<8"]
SCALING = ["scipy<1.18", "pandas<3.2", "matplotlib<3.12", "pyarrow<27", "threadpoolctl<4"]
DEEPSPEED = ["deepspeed>=0.16,<0.20"]  # tested 0.19.8
EVAL = ["lm_eval[hf]>=0.4.13,<0.4.14"]  # tools/evaluate.py --tasks; tested 0.4.13
TESTS = ["pytest>=8,<9.3", "pytest-timeout<2.5", "pytest-xdist>=3.6,<3.9"]

setup(
    name="rf-megatron",
    version="0.1.0",
    description="Value residual learning (ResFormer/SVFormer) for Megatron-Core pretraining at scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rf_megatron", "rf_megatron.*"]),
    package_data={"rf_megatron": ["presets/*.yaml", "presets/deepspeed/*.json"]},  # `--config tiny_cpu` anywhere
    entry_points={"console_scripts": [
        # our launcher (rf_megatron/launch.py): torchrun's options, the failing rank's own error line and exit code
        "rf-pretrain = rf_megatron.launch:main",
        "rf-train = rf_megatron.cli.train:run",  # one process (or one srun task): pretrain/pretrain_resformer.py
        "rf-train-deepspeed = rf_megatron.cli.train_deepspeed:run",
        "rf-convert-to-hf = rf_megatron.cli.convert_to_hf:run",
        "rf-convert-from-hf = rf_megatron.cli.convert_from_hf:run",
    ]},
    # Every upper bound is a version CI ran (constraints.txt holds the exact set; RF_CI_LATEST=1 bash .ci/run tries
    # the newest versions these ranges allow). Raise a bound only after that run is green.
    install_requires=[
        "torch>=2.4,<2.14",  # tested 2.13.0
        # Tested: 0.16.1 (Python 3.11) and 0.19.2 (Python >= 3.12 clusters; on 3.11 see .ci/run).
        "megatron-core>=0.16.1,<0.20",
        "numpy<2.5",
        "pyyaml<7",
        "psutil<8",  # dist_checkpointing saves hang without it
        "sentencepiece<0.3",
    ],
    extras_require={
        "logging": LOGGING,
        "hf": HF,
        "scaling": SCALING,
        # pretrain/pretrain_hf_deepspeed.py (CPU accelerator + gloo, or CUDA + NCCL)
        "deepspeed": DEEPSPEED + HF,
        "eval": EVAL + HF,
        "dev": TESTS + LOGGING + HF + SCALING + DEEPSPEED + EVAL,
        "gpu": ["transformer-engine[pytorch]"],  # not installable without CUDA: never run by CI
    },
)
