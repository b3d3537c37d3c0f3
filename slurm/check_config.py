"""Pre-flight check for a SLURM training job, run before anything expensive is launched.

    python slurm/check_config.py --world-size 16 [--engine deepspeed] [--shell] PRESET [key=value ...]

Loads the preset with its overrides exactly as the trainer will, and checks: the preset exists,
every option is valid, the world size (nodes x tasks per node) fits TP x PP x CP and the batch
sizes (--engine deepspeed: the DeepSpeed config instead of TP x PP), the data and tokenizer files exist, the checkpoint and log directories are writable.
On failure it prints ONE line `error: ...` to stderr and exits 2.

With --shell it prints what the batch script needs to know afterwards, as shell assignments:
RF_CKPT_DIR, RF_LOG_DIR, RF_TRAIN_STEPS, RF_RESUME, RF_RUN_NAME.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_megatron.config import ConfigError  # noqa: E402
from rf_megatron.run_config import RunConfig, load_run_config  # noqa: E402


def _writable_dir(option: str, path: str) -> None:
    """`path` accepts new files (or, not there yet, its nearest existing parent would let it be made). Nothing is
    created: a refused or --dry-run submission leaves no directories behind."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option}={path} is not writable (Not a directory)")
    try:
        if probe == p:  # a real write: read-only mounts and quotas show up here, not in os.access
            with tempfile.NamedTemporaryFile(dir=p, prefix=".rf-write-test-"):
                pass
        elif not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{option}={path} is not writable ({reason})") from None


def _data_files(cfg: RunConfig) -> None:
    from rf_megatron.data import blend_prefixes
    from rf_megatron.indexed_data import DataError, verify_indexed_dataset

    tok = cfg.data.tokenizer_model
    if tok and not Path(tok).is_file():
        raise ConfigError(f"data.tokenizer_model={tok}: no such file (cwd {os.getcwd()})")
    d = cfg.data
    for prefix in blend_prefixes(d.paths) + blend_prefixes(d.valid_paths) + blend_prefixes(d.test_paths):
        try:
            verify_indexed_dataset(prefix)  # reads only the .idx (and the .bin's size)
        except DataError as exc:
            raise ConfigError(str(exc)) from None


def _validate_deepspeed(cfg: RunConfig, world_size: int) -> None:
    from rf_megatron.engines import deepspeed_config as ds_config
    from rf_megatron.engines.deepspeed import prepare_config

    prepare_config(cfg, world_size)
    ds_config.resolve(cfg, world_size, cuda=True)  # the batch host may have no GPU: the ranks check that


def check(config: str, overrides, world_size: int, layout: str = "", engine: str = "megatron") -> RunConfig:
    """Raise ConfigError (one line) if the job cannot work; return the resolved config."""
    cfg = load_run_config(config, list(overrides))
    try:
        if engine == "deepspeed":
            _validate_deepspeed(cfg, world_size)
        else:
            cfg.validate(world_size)
    except ConfigError as exc:
        msg = str(exc)
        if layout and "world size" in msg:
            msg = msg.replace(f"world size {world_size}", f"world size {world_size} ({layout})", 1)
        elif layout and "data_parallel" in msg:
            msg += f" (world size {world_size} = {layout})"
        raise ConfigError(msg) from None
    _data_files(cfg)
    if cfg.checkpoint.dir:
        _writable_dir("checkpoint.dir", cfg.checkpoint.dir)
    _writable_dir("logging.dir", cfg.logging.dir)
    return cfg


def shell_vars(cfg: RunConfig) -> str:
    values = {
        "RF_CKPT_DIR": os.path.abspath(cfg.checkpoint.dir) if cfg.checkpoint.dir else "",
        "RF_LOG_DIR": os.path.abspath(cfg.logging.dir),
        "RF_TRAIN_STEPS": str(cfg.train.train_steps),
        "RF_RESUME": "1" if cfg.checkpoint.resume else "0",
        "RF_RUN_NAME": cfg.name,
    }
    return "\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, required=True, help="total number of ranks (nodes x tasks/node)")
    parser.add_argument("--layout", default="", help="how the world size came about, for messages")
    parser.add_argument("--shell", action="store_true", help="print shell assignments for the batch script")
    parser.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                        help="which trainer the job runs (pretrain_resformer.py or pretrain_hf_deepspeed.py)")
    parser.add_argument("config", help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        if args.world_size < 1:
            raise ConfigError(f"world size {args.world_size} must be >= 1")
        cfg = check(args.config, args.overrides, args.world_size, args.layout, args.engine)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shell:
        print(shell_vars(cfg))
    else:
        print(f"ok: {cfg.name}, world size {args.world_size}, checkpoints in {cfg.checkpoint.dir or '(none)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
