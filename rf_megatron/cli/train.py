"""Pretrain a value-residual (or vanilla) GPT with Megatron-Core.

    torchrun --nproc-per-node 2 pretrain/pretrain_resformer.py --config tiny_cpu [key=value ...]
    srun ... python pretrain/pretrain_resformer.py --config resformer_468m data.paths=[...]

`--config` is a preset in rf_megatron/presets/ or a YAML file; `section.key=value` overrides follow
(e.g. `model.variant=svformer train.train_steps=200 parallel.tensor_parallel=2`).
"""
import argparse
import os

from .. import child_lifetime
from ..entry_point import run_entry_point
from ..errors import ArgumentParser
from ..resume import stop_if_finished
from ..run_config import load_run_config

# At import, so that it also runs where multiprocessing's spawned helpers re-import this script (__mp_main__)
child_lifetime.install()


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_cpu", help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="section.key=value")

    def build():
        args = parser.parse_args(argv)  # a mistake here is a ConfigError: one line for the job
        cfg = load_run_config(args.config, args.overrides)  # config errors come before the slow imports
        stop_if_finished(cfg)  # a finished run (a re-run sweep, a resubmitted job) ends here, as fast, on any layout
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # every problem of the config in one line
        from ..engines.megatron import Trainer

        return Trainer(cfg)

    return run_entry_point(build)


def run() -> None:
    """The console script: main() with the exit that a process group needs (child_lifetime.exit_process)."""
    child_lifetime.exit_process(main())


if __name__ == "__main__":
    run()
