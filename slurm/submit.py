"""Submit a training job or a sweep to SLURM after checking it, so that mistakes fail here in one
line instead of in a queued job.

    python slurm/submit.py [options] PRESET [section.key=value ...]     # slurm/pretrain.sbatch
    python slurm/submit.py [options] --sweep FILE [--max-parallel K]    # slurm/sweep.sbatch, one array task per line

    python slurm/submit.py --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 --time 24:00:00 \\
        --exp svf-468m resformer_468m model.variant=svformer data.paths=[/data/sp_text_document]
    python slurm/submit.py --sweep slurm/sweeps/tiny_variants.txt --max-parallel 2 --ntasks-per-node 2

The experiment (--exp, default: the preset plus a hash of the overrides, or the sweep file's name)
owns runs/<exp>/: metrics.jsonl, checkpoints/ and the job's log slurm-<jobid>.out (sweeps:
runs/<exp>/<i>/ per configuration and slurm-<jobid>_<i>.out). Submitting the same experiment again
resumes from its latest checkpoint; a run (or sweep line) whose latest checkpoint already reached
train.train_steps is not submitted at all (one line says so). The job saves, requeues itself and resumes when
SLURM warns --signal-seconds before the time limit (see slurm/pretrain.sbatch). Extra sbatch options go after
--sbatch (e.g. --sbatch=--qos=high). Prints the job id on stdout.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parent
REPO = SLURM_DIR.parent
sys.path.insert(0, str(SLURM_DIR))
sys.path.insert(0, str(REPO))


def default_exp(config: str, overrides) -> str:
    """Same rule as slurm/pretrain.sbatch: preset stem, plus a hash of the overrides if any."""
    stem = Path(config).name
    for ext in (".yaml", ".yml"):
        stem = stem[: -len(ext)] if stem.endswith(ext) else stem
    if not overrides:
        return stem
    return f"{stem}-{hashlib.sha1(''.join(o + chr(10) for o in overrides).encode()).hexdigest()[:8]}"


def exp_overrides(exp: str, runs: str):
    """The per-experiment defaults slurm/pretrain.sbatch puts before the user's overrides."""
    return [f"name={exp.replace('/', '-')}", f"logging.dir={runs}/{exp}", f"checkpoint.dir={runs}/{exp}/checkpoints"]


def time_limit_seconds(limit: str) -> int:
    """sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    days, _, rest = limit.partition("-") if "-" in limit else ("0", "", limit)
    parts = [int(p) for p in rest.split(":")]
    if "-" in limit:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[:3]
    return ((int(days) * 24 + h) * 60 + m) * 60 + s


DEFAULT_SIGNAL_SECONDS = 300  # the scripts' own `#SBATCH --signal=B:USR1@300`


def check_signal_lead(limit, signal_seconds, typed: bool = True):
    """The save-and-requeue warning must leave the job time to train: at most half the time limit. Returns a note
    (or None) for a time limit without any warning: SLURM's SIGTERM at the limit saves but never requeues."""
    from rf_megatron.config import ConfigError

    if signal_seconds < 0:
        raise ConfigError(f"--signal-seconds {signal_seconds}: give seconds >= 0 (0: no warning)")
    if not limit:
        return None
    try:
        seconds = time_limit_seconds(limit)
    except ValueError:
        raise ConfigError(f"--time {limit}: use minutes, HH:MM:SS or D-HH:MM:SS") from None
    if signal_seconds * 2 > seconds:
        given = f"--signal-seconds {signal_seconds}" + ("" if typed else " (the default)")
        raise ConfigError(f"{given} is more than half of --time {limit} ({seconds} s): the save-and-requeue signal "
                          "would come almost at once in every run; use a longer --time or "
                          f"--signal-seconds N with N <= {seconds // 2} (0: no warning)")
    if not signal_seconds:
        return (f"note: --signal-seconds 0: no warning before the --time {limit} limit; SLURM's SIGTERM there makes "
                "the ranks save (if within its KillWait) and the job ends without requeueing: resubmit to resume")
    return None


def finished_runs(configs):
    """[(index, message)] for the configurations whose latest checkpoint already reached train.train_steps
    (rf_megatron/resume.py's test, the one the trainer makes at start): submitting them would hold a node to say so."""
    from rf_megatron.resume import AlreadyFinished, stop_if_finished

    done = []
    for i, cfg in configs:
        try:
            stop_if_finished(cfg)
        except AlreadyFinished as exc:
            done.append((i, str(exc)))
    return done


def array_spec(indices) -> str:
    """sbatch --array for these task indices: runs of consecutive ones as ranges (0-3,5,7-9)."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(f"{start}-{i}" if i > start else f"{i}")
            start = None
    return ",".join(parts)


class ControllerDown(Exception):
    """scontrol cannot reach slurmctld: nothing can be submitted now, and no partition can be checked."""


def _partition(name):
    """(name, fields) of the named or the default partition, from `scontrol show partition -o`."""
    from rf_megatron.config import ConfigError

    proc = subprocess.run(["scontrol", "show", "partition", "-o", *([name] if name else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        said = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else "not found"
        if "Unable to contact slurm controller" in said:
            raise ControllerDown(f"the SLURM controller does not answer ({said})")
        raise ConfigError(f"--partition {name or '(the default)'}: {said}")
    for line in proc.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if name or fields.get("Default") == "YES":
            return fields.get("PartitionName"), fields
    return None, {}


def check_partition(name, nodes: int, tasks_per_node: int, gpus_per_node: int) -> None:
    """Refuse what the partition can never run (it would pend forever): too many nodes, more tasks per node than a
    node has CPUs, more GPUs per node than a node has."""
    from rf_megatron.config import ConfigError

    part, fields = _partition(name)
    if not part:
        return
    limit = min(int(v) for v in (fields.get("TotalNodes"), fields.get("MaxNodes")) if v and v.isdigit())
    if nodes > limit:
        raise ConfigError(f"--nodes {nodes}: partition {part} has {limit} node(s)")
    proc = subprocess.run(["sinfo", "-h", "-N", "-p", part, "-o", "%c %G"], capture_output=True, text=True)
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not rows:
        return
    cpus = max(int(r[0].rstrip("+")) for r in rows)
    if tasks_per_node > cpus:
        raise ConfigError(f"--ntasks-per-node {tasks_per_node}: the nodes of partition {part} have at most {cpus} CPUs")
    gpus = max(_gres_gpus(r[1] if len(r) > 1 else "") for r in rows)
    if gpus_per_node > gpus:
        hint = " (a CPU-only partition: --gpus-per-node 0)" if gpus == 0 else ""
        raise ConfigError(f"--gpus-per-node {gpus_per_node}: the nodes of partition {part} have {gpus} GPU(s){hint}")


def _gres_gpus(gres: str) -> int:
    """GPUs in a sinfo %G field such as 'gpu:8', 'gpu:h100:8(S:0-1)' or '(null)'."""
    total = 0
    for item in gres.split(","):
        bits = item.split("(")[0].split(":")
        if bits[0] == "gpu" and bits[-1].isdigit():
            total += int(bits[-1])
    return total


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one `error:` line (not argparse's usage block first) and a pointer to --help."""

    def error(self, message):
        self.exit(2, f"error: {message} (python slurm/submit.py --help)\n")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="preset name or YAML path (not with --sweep)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--sweep", metavar="FILE", help="one configuration per line: PRESET key=value ...")
    parser.add_argument("--max-parallel", type=int, default=0, metavar="K", help="sweep: at most K tasks at once")
    parser.add_argument("--exp", help="experiment name (directory under --runs)")
    parser.add_argument("--runs", default="runs", help="root of the experiment directories (default: runs)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--ntasks-per-node", type=int, default=1, help="one task (rank) per GPU")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="default: one per task (--ntasks-per-node); 0 on a CPU-only cluster")
    parser.add_argument("--time", help="time limit, e.g. 4:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--signal-seconds", type=int, default=None,
                        help=f"SIGUSR1 this long before the time limit: save, requeue, resume (default "
                             f"{DEFAULT_SIGNAL_SECONDS}; 0: none, overriding the scripts' own #SBATCH --signal)")
    parser.add_argument("--max-restarts", type=int, help="RF_MAX_RESTARTS (default 10)")
    parser.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                        help="trainer: Megatron-Core or the HF model with DeepSpeed ZeRO (RF_ENGINE)")
    parser.add_argument("--python", help="interpreter inside the job (RF_PYTHON; default: python on PATH)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="ARG", help="extra sbatch argument")
    parser.add_argument("--no-check", action="store_true", help="skip the pre-flight check here (the job still runs it)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the sbatch command only")
    args = parser.parse_args(argv)

    from check_config import check
    from rf_megatron.config import ConfigError
    from rf_megatron.run_config import load_run_config

    signal_typed = args.signal_seconds is not None
    if not signal_typed:
        args.signal_seconds = DEFAULT_SIGNAL_SECONDS

    def resolve(preset, overrides):
        """The run config the job will train (checked for this world size unless --no-check)."""
        if args.no_check:
            return load_run_config(preset, list(overrides))
        return check(preset, overrides, world, layout, args.engine)

    if args.gpus_per_node is None:
        args.gpus_per_node = args.ntasks_per_node  # one rank per GPU: never a GPU job that silently gets none
    world = args.nodes * args.ntasks_per_node
    layout = f"{args.nodes} node(s) x {args.ntasks_per_node} task(s)"
    try:
        if args.nodes < 1 or args.ntasks_per_node < 1:
            raise ConfigError("--nodes and --ntasks-per-node must be >= 1")
        if args.gpus_per_node and args.gpus_per_node < args.ntasks_per_node:
            raise ConfigError(f"--gpus-per-node {args.gpus_per_node} < --ntasks-per-node {args.ntasks_per_node}: "
                              "each task (rank) needs a GPU of its own")
        if args.sweep:
            if args.config:
                raise ConfigError("give either --sweep FILE or PRESET [overrides], not both")
            sweep = Path(args.sweep)
            if not sweep.is_file():
                raise ConfigError(f"sweep file {sweep} not found")
            from rf_megatron.scaling.sweep import parse_line, run_lines  # one reader for local and SLURM sweeps

            lines = run_lines(sweep)
            if not lines:
                raise ConfigError(f"sweep file {sweep} holds no configurations")
            exp = args.exp or sweep.stem
            configs = []
            for i, line in enumerate(lines):
                try:
                    preset, overrides = parse_line(line)
                except ValueError as exc:
                    raise ConfigError(f"{sweep} configuration {i}: {exc}") from None
                try:
                    configs.append((i, resolve(preset, exp_overrides(f"{exp}/{i}", args.runs) + overrides)))
                except ConfigError as exc:
                    raise ConfigError(f"{sweep} configuration {i} ({line}): {exc}") from None
        else:
            if not args.config:
                raise ConfigError("give a preset (and overrides) or --sweep FILE")
            exp = args.exp or default_exp(args.config, args.overrides)
            configs = [(0, resolve(args.config, exp_overrides(exp, args.runs) + args.overrides))]
        note = check_signal_lead(args.time, args.signal_seconds, signal_typed)
        if not shutil.which("sbatch") and not args.dry_run:
            raise ConfigError("sbatch not found: is this a SLURM login node? (slurm/local-cluster/start.sh "
                              "starts a local cluster)")
        if shutil.which("scontrol"):
            try:
                check_partition(args.partition, args.nodes, args.ntasks_per_node, args.gpus_per_node)
            except ControllerDown as exc:
                if not args.dry_run:
                    raise ConfigError(f"{exc}: is slurmctld running? (scontrol ping)") from None
                note = (note + "\n" if note else "") + f"note: {exc}: the partition's limits are not checked"
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    finished = finished_runs(configs)
    for i, message in finished:
        print(f"skipping {f'configuration {i}: ' if args.sweep else ''}{message}", file=sys.stderr)
    todo = sorted(set(i for i, _ in configs) - set(i for i, _ in finished))
    if not todo:
        print(f"nothing to submit: {'every configuration of ' + args.sweep if args.sweep else exp} has finished",
              file=sys.stderr)
        return 0

    out_dir = Path(args.runs) / exp
    cmd = ["sbatch", "--parsable", f"--job-name={exp.replace('/', '-')}", f"--nodes={args.nodes}",
           f"--ntasks-per-node={args.ntasks_per_node}"]
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    for opt in ("time", "partition", "account"):
        if getattr(args, opt):
            cmd.append(f"--{opt}={getattr(args, opt)}")
    # always on the command line, which overrides the scripts' own `#SBATCH --signal=B:USR1@300`: @0 is no warning
    # at all (SLURM sends none with a zero lead; checked on slurm/local-cluster, SLURM 22.05)
    cmd.append(f"--signal=B:USR1@{args.signal_seconds}")
    if args.sweep:
        throttle = f"%{args.max_parallel}" if args.max_parallel else ""
        cmd += [f"--array={array_spec(todo)}{throttle}", f"--output={out_dir}/slurm-%A_%a.out"]
    else:
        cmd.append(f"--output={out_dir}/slurm-%j.out")
    cmd += args.sbatch
    if args.sweep:
        cmd += [str(SLURM_DIR / "sweep.sbatch"), str(Path(args.sweep).resolve())]
    else:
        cmd += [str(SLURM_DIR / "pretrain.sbatch"), args.config, *args.overrides]
    env = {**os.environ, "RF_REPO": str(REPO), "RF_EXP": exp, "RF_RUNS": args.runs, "RF_ENGINE": args.engine}
    if args.python:
        env["RF_PYTHON"] = args.python
    if args.max_restarts is not None:
        env["RF_MAX_RESTARTS"] = str(args.max_restarts)
    shown = " ".join(shlex.quote(c) for c in cmd)
    if args.dry_run:
        print(f"RF_REPO={shlex.quote(str(REPO))} RF_EXP={shlex.quote(exp)} RF_RUNS={shlex.quote(args.runs)} "
              f"RF_ENGINE={args.engine} {shown}")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)  # sbatch writes the job's log there
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: sbatch failed: {proc.stderr.strip() or proc.stdout.strip()}", file=sys.stderr)
        return 1
    job = proc.stdout.strip().split(";")[0]
    log = f"{out_dir}/slurm-{job}_<i>.out" if args.sweep else f"{out_dir}/slurm-{job}.out"
    print(job)
    print(f"submitted job {job} ({exp}): log {log}, metrics and checkpoints under {out_dir}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
