"""The whole run as one dataclass tree, loaded from a YAML preset plus `section.key=value` overrides.

Validated before any process group exists: unknown keys (with a "did you mean"), wrong types,
batch sizes that do not divide, missing data; every problem of one start in one message, not one per start.
`model.vocab_size=null` becomes the tokenizer's padded vocabulary on load (rf_megatron/vocab.py). The resolved
tree is saved with every run and every checkpoint (`save_yaml`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from .console import is_rank0
from .indexed_data import dataset_prefix

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: found wherever rf_megatron is installed


@dataclass
class DataConfig:
    # Megatron-style blend: ["0.7", "data/a_text_document", "0.3", "data/b"] or just prefixes.
    paths: List[str] = field(default_factory=list)
    tokenizer_model: Optional[str] = None
    split: str = "98,1,1"  # train,valid,test weights
    # a held-out validation set of its own (Megatron-LM's --valid-data-path): prefixes or a blend; then
    # data.split must give validation nothing (e.g. 100,0,0)
    valid_paths: List[str] = field(default_factory=list)
    # a held-out test set (--test-data-path): scored once, after the last step (and by train.eval_only); then
    # data.split must give test nothing (e.g. 100,0,0)
    test_paths: List[str] = field(default_factory=list)
    cache_dir: Optional[str] = None

    def __post_init__(self):
        # a dataset's .bin or .idx file names its prefix, which is what Megatron reads (a blend's weights stay)
        for option in ("paths", "valid_paths", "test_paths"):
            setattr(self, option, [dataset_prefix(p) if isinstance(p, str) else p for p in getattr(self, option)])


@dataclass
class TrainConfig:
    train_steps: int = 1000
    global_batch_size: int = 8
    micro_batch_size: int = 2
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100  # 0: only at the end
    eval_steps: int = 4  # global batches per evaluation: always the same first samples of the validation set
    eval_full: bool = False  # score the whole validation (and test) set at every evaluation; eval_steps is ignored
    # the evaluation after the last step (and train.eval_only, and the test set) scores the whole held-out set,
    # while the evaluations every eval_interval steps stay eval_steps batches (a weighted blend: always those)
    final_eval_full: bool = False
    eval_only: bool = False  # evaluate once (the checkpoint resumed, else the initialisation) and exit: no training
    # a step whose loss exceeds this x the mean of the last 10 marks the checkpoint before it unhealthy
    # (rf_megatron/checkpoint_health.py); 0: only non-finite values do
    loss_spike_factor: float = 3.0
    lambda_log_interval: int = 100  # per-layer lambdas of learnable variants
    nan_policy: str = "stop"  # stop | skip: what a NaN/Inf loss or grad norm does
    exit_duration_mins: Optional[float] = None  # save and exit cleanly after this wall time
    exit_on_signal: bool = True  # SIGTERM / SIGUSR1 / SIGINT: finish the step, save, exit 0 (a 2nd SIGINT: at once)
    exit_interval: Optional[int] = None  # save and exit after a step that is a multiple of this


@dataclass
class CheckpointConfig:
    dir: Optional[str] = "{logging.dir}/checkpoints"  # null: no checkpoints
    save_interval: int = 0  # 0: only at the end (and on exit signals)
    keep_last: int = 2
    resume: bool = True  # resume automatically from the latest checkpoint in dir
    start_over: bool = False  # a fresh run in a dir with checkpoints: move them aside into previous-<time>/
    # resume from the newest checkpoint known healthy, past those a divergence marked unhealthy (moved aside),
    # skipping the data the diverging steps read (rf_megatron/checkpoint_health.py)
    rewind_to_healthy: bool = False


@dataclass
class LoggingConfig:
    dir: str = "runs/{name}"  # resolved config, metrics.jsonl, tensorboard, wandb
    wandb_project: Optional[str] = None  # online when a key is configured, else offline
    tensorboard: bool = False
    peak_tflops: Optional[float] = None  # per device, for MFU; null: looked up from the GPU (rf_megatron/device_peak.py)


@dataclass
class DeepSpeedConfig:
    """Only pretrain/pretrain_hf_deepspeed.py reads this (the Megatron trainer ignores it; that one
    reads `parallel`, which DeepSpeed ignores: it is data parallel over every process)."""

    config: str = "zero2"  # zero1 | zero2 | zero3 (rf_megatron/presets/deepspeed/) or a DeepSpeed JSON file
    zero_stage: Optional[int] = None  # overrides zero_optimization.stage of that config
    init_from_hf: Optional[str] = None  # start from this HF folder (Llama / RFGPT) instead of a fresh init
    hf_output: Optional[str] = None  # the final HF folder (default: <logging.dir>/hf)


# Where a run's default differs from the bare dataclass's: a run takes the tokenizer's vocabulary (rf_megatron/vocab.py)
RUN_DEFAULTS = {"model.": {"vocab_size": None}}


@dataclass
class RunConfig:
    name: str = "default"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**RUN_DEFAULTS["model."]))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Every problem at once: a ConfigError with one line (`N problems in the config: a; b`)."""
        raise_all(self.problems(world_size))

    def problems(self, world_size: Optional[int] = None) -> List[str]:
        """The first problem of each independent check: parallel layout, tokenizer and vocabulary, model, optimizer,
        training, data. A check that needs a valid layout runs against the default one when the layout is wrong."""
        from .vocab import padded_vocab_size

        found: List[str] = []

        def check(run, *args) -> bool:
            try:
                run(*args)
                return True
            except ConfigError as exc:
                found.append(str(exc))
                return False

        layout_ok = check(self.parallel.validate, world_size)
        parallel = self.parallel if layout_ok else ParallelConfig()
        check(self._validate_vocabulary)
        model = self.model
        if model.vocab_size is None:  # the tokenizer could not say: the model's other options are still checked
            model = dataclasses.replace(model, vocab_size=padded_vocab_size(1, 1, parallel.tensor_parallel))
        check(model.validate, parallel)
        check(self.optim.validate)
        check(self._validate_train, world_size if layout_ok else None)
        check(self._validate_data)
        return found

    def _validate_train(self, world_size: Optional[int]) -> None:
        t = self.train
        if t.eval_only and self.checkpoint.start_over:
            raise ConfigError("train.eval_only=true with checkpoint.start_over=true: an evaluation never moves "
                              "checkpoints; drop one of them")
        if t.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"train.nan_policy={t.nan_policy!r}: choose stop or skip")
        if not (math.isfinite(t.loss_spike_factor) and (t.loss_spike_factor == 0 or t.loss_spike_factor > 1)):
            raise ConfigError(f"train.loss_spike_factor={t.loss_spike_factor} must be > 1 (or 0: no spike check)")
        for name in ("train_steps", "global_batch_size", "micro_batch_size", "log_interval", "eval_steps"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name}={getattr(t, name)} must be positive")
        for path, value in (("train.eval_interval", t.eval_interval), ("train.lambda_log_interval", t.lambda_log_interval),
                            ("checkpoint.save_interval", self.checkpoint.save_interval),
                            ("checkpoint.keep_last", self.checkpoint.keep_last)):
            if value < 0:
                raise ConfigError(f"{path}={value} must be >= 0 (0 turns it off)")
        for path, value in (("train.exit_duration_mins", t.exit_duration_mins), ("train.exit_interval", t.exit_interval)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{path}={value} must be positive (or null: off)")
        if self.optim.lr_warmup_steps >= t.train_steps:
            raise ConfigError(f"optim.lr_warmup_steps={self.optim.lr_warmup_steps} must be smaller than "
                              f"train.train_steps={t.train_steps}")
        if world_size is not None:
            mp = self.parallel.tensor_parallel * self.parallel.pipeline_parallel * self.parallel.context_parallel
            dp = world_size // mp
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                                  f"micro_batch_size*data_parallel={t.micro_batch_size}*{dp}")

    def _validate_vocabulary(self) -> None:
        """data.tokenizer_model can be read, and model.vocab_size (null: resolved from it here) holds its pieces."""
        from .vocab import check_vocab_size, resolve_vocab_size, tokenizer_vocabulary

        if not self.data.tokenizer_model:
            raise ConfigError("data.tokenizer_model is not set" + (
                " (model.vocab_size=null takes the vocabulary from it)" if self.model.vocab_size is None else ""))
        problem = resolve_vocab_size(self)  # null -> the tokenizer's, padded (done on load when it could be read)
        if problem:
            raise ConfigError(problem)
        check_vocab_size(self.model.vocab_size, tokenizer_vocabulary(self.data.tokenizer_model), self.data.tokenizer_model)

    def _validate_data(self) -> None:
        if not self.data.paths:
            raise ConfigError("data.paths is empty: give one or more indexed dataset prefixes (tools/preprocess_data.py)")
        from .data import check_held_out_sources

        check_held_out_sources(self.data)


def _type_check(path: str, value: Any, hint) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _type_check(path, value, next(a for a in args if a is not type(None)))
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list, e.g. {path}=[{value}]")
        return [_type_check(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{path}={value!r}: expected {hint.__name__}")
    return value


# Renamed options: the old key keeps working, with a one-line note (rank 0) when it is set.
RENAMED = {"model.residual_layers": "model.sparse_layers"}


def _renamed(path: str, value: Any) -> str:
    new = RENAMED[path]
    if value is not None and is_rank0():
        print(f"note: {path} is deprecated, use {new} (same meaning)", file=sys.stderr, flush=True)
    return new.rsplit(".", 1)[-1]


def raise_all(problems: List[str]) -> None:
    """One ConfigError for every problem found (one line, as the entry points print it); none: return."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config: " + "; ".join(problems))


def _build(cls, data: Dict[str, Any], prefix: str, problems: Optional[List[str]] = None):
    """`cls` from a YAML mapping. Each unknown key or wrong type is appended to `problems` and that option keeps
    its default; the top-level call raises them all together."""
    top = problems is None
    problems = [] if top else problems
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{prefix}{key}"
        try:
            if path in RENAMED:
                key = _renamed(path, value)
                if key in (data or {}):
                    raise ConfigError(f"{path} and {RENAMED[path]} are both set: keep {RENAMED[path]}")
                path = RENAMED[path]
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                raise ConfigError(f"unknown option {path}{hint}")
            if dataclasses.is_dataclass(hints[key]):
                if not isinstance(value, dict):
                    raise ConfigError(f"{path} must be a section (a mapping)")
                kwargs[key] = _build(hints[key], value, f"{path}.", problems)
            else:
                kwargs[key] = _type_check(path, value, hints[key])
        except ConfigError as exc:
            problems.append(str(exc))
    if top:
        raise_all(problems)
    for key, value in RUN_DEFAULTS.get(prefix, {}).items():
        kwargs.setdefault(key, value)
    return cls(**kwargs)


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a preset ({known})")


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """["model.hidden_size=128", "data.paths=[a,b]"] -> nested dict (values parsed as YAML)."""
    tree: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), (dict, type(None))) else v
    return out


def load_run_config(config: str, overrides: Optional[List[str]] = None) -> RunConfig:
    path = resolve_preset(config)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    cfg = resolve_output_dirs(_build(RunConfig, _merge(data, parse_overrides(overrides or [])), ""))
    from .vocab import resolve_vocab_size

    resolve_vocab_size(cfg)  # model.vocab_size=null -> the tokenizer's; if it cannot be read, validate() says why
    return cfg


def resolve_output_dirs(cfg: RunConfig) -> RunConfig:
    """Fill `{name}` and `{logging.dir}` into the output folders, so that `name=x` alone gives a run its own
    folders (runs/x, runs/x/checkpoints) and a preset never sends two runs into one."""
    cfg.logging.dir = cfg.logging.dir.replace("{name}", cfg.name)
    if cfg.checkpoint.dir is not None:
        cfg.checkpoint.dir = cfg.checkpoint.dir.replace("{name}", cfg.name).replace("{logging.dir}", cfg.logging.dir)
    return cfg


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: RunConfig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
