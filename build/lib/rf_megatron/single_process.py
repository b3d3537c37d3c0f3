"""`python pretrain/pretrain_resformer.py ...` with no launcher trains as one process, as nanoGPT and the HF
Trainer do: rank 0 of a world of 1, rendezvous on a free local port. Several processes still come from a launcher
(torchrun, `python -m rf_megatron.launch`, `deepspeed`, slurm/task.sh under srun), which sets RANK and WORLD_SIZE."""
from __future__ import annotations

import os

from .config import ConfigError

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE")


def default_to_one_process() -> None:
    """Fill in what a launcher would have set, when no launcher set it; leave a launched process alone."""
    if any(key in os.environ for key in LAUNCHER_VARIABLES):
        return
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if os.environ.get("SLURM_PROCID") is not None and tasks != "1":
        # each srun task would train alone, all into the same folders
        raise ConfigError(f"started by srun as one of {tasks} tasks without RANK / WORLD_SIZE: launch through "
                          "slurm/pretrain.sbatch (slurm/task.sh sets them) or torchrun")
    from .ports import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
