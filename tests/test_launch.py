"""How a run is launched and what it tells its user: a plain `python` launch trains as one process, `name=` chooses the
output folders, the step lines and the closing summary, Ctrl-C (SIGINT) saves, and our launcher
(rf_megatron/launch.py) ends a failed job with the rank's own error line and exit code."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_pretrain import data, overrides  # noqa: F401  (module-scoped data fixture)

TRAIN = REPO / "pretrain" / "pretrain_resformer.py"
# no launcher: none of the variables torchrun would set
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(RF_MEGATRON_CPU="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
NAME = "plain_run"


def plain_command(data, **extra):
    """`python pretrain/pretrain_resformer.py --config tiny_cpu name=plain_run ...`, one process, and no
    logging.dir / checkpoint.dir: the folders come from the name."""
    args = overrides(data, Path("unused"), **{"parallel.tensor_parallel": 1, "name": NAME, "train.train_steps": 200, **extra})
    return [sys.executable, str(TRAIN), "--config", "tiny_cpu",
            *(a for a in args if not a.startswith(("logging.dir=", "checkpoint.dir=")))]


def launcher_command(data):
    """The same run as 2 ranks (TP2) under our launcher."""
    return [sys.executable, "-m", "rf_megatron.launch", "--nproc-per-node", "2", str(TRAIN),
            *plain_command(data)[2:], "parallel.tensor_parallel=2"]


def ctrl_c(data, cwd, presses, command=plain_command):
    """Start a run (a plain-python one unless `command` says), and once it has logged 3 steps press Ctrl-C `presses`
    times (SIGINT to its process group, as a terminal sends it: our launcher's ranks run in sessions of their own).
    Returns (exit code, output)."""
    proc = subprocess.Popen(command(data), cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    metrics = cwd / "runs" / NAME / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)
    for _ in range(presses):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    """A plain-python run stopped by one Ctrl-C: (its folder, exit code, output, the step it saved)."""
    cwd = tmp_path_factory.mktemp("plain")
    code, out = ctrl_c(data, cwd, presses=1)
    latest = cwd / "runs" / NAME / "checkpoints" / "latest"
    stopped = int(latest.read_text().split("_")[1]) if latest.exists() else None
    return cwd, code, out, stopped


@pytest.fixture(scope="module")
def resumed(data, interrupted):
    """The same command run again (2 more steps): it resumes and finishes."""
    cwd, _, _, stopped = interrupted
    assert stopped, "the interrupted run saved no checkpoint"
    proc = subprocess.run(plain_command(data, **{"train.train_steps": stopped + 2}), cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc, stopped


def test_name_sets_the_logging_and_checkpoint_folders_and_the_run_says_where(interrupted):
    cwd, _, out, _ = interrupted
    assert (cwd / "runs" / NAME / "metrics.jsonl").exists() and (cwd / "runs" / NAME / "config.yaml").exists()
    assert (cwd / "runs" / NAME / "checkpoints" / "latest").exists()
    assert f"writing to runs/{NAME} (metrics.jsonl, config.yaml), checkpoints to runs/{NAME}/checkpoints" in out


def test_first_ctrl_c_finishes_the_step_saves_and_prints_the_resume_line(interrupted):
    _, code, out, stopped = interrupted
    assert code == 0, out[-3000:]
    assert 3 <= stopped < 200 and "Traceback" not in out and "KeyboardInterrupt" not in out
    assert f"signal SIGINT: saving at step {stopped} and exiting" in out
    assert out.rstrip().splitlines()[-1] == f"stopped at step {stopped} (signal SIGINT); rerun the same command to resume"


def test_second_ctrl_c_exits_at_once_without_saving(data, tmp_path):
    code, out = ctrl_c(data, tmp_path, presses=2)
    assert code == 130, out[-3000:]
    assert "second interrupt: exiting now, without saving" in out and "saved checkpoint" not in out
    assert not (tmp_path / "runs" / NAME / "checkpoints" / "latest").exists()


def test_ctrl_c_under_the_launcher_saves_and_exits_0(data, tmp_path):
    code, out = ctrl_c(data, tmp_path, presses=1, command=launcher_command)
    latest = tmp_path / "runs" / NAME / "checkpoints" / "latest"
    assert code == 0 and latest.exists(), out[-3000:]
    stopped = int(latest.read_text().split("_")[1])
    assert f"signal SIGINT: saving at step {stopped} and exiting" in out and "Traceback" not in out, out[-3000:]


def test_second_ctrl_c_under_the_launcher_exits_at_once_without_saving(data, tmp_path):
    """The launcher's ranks do not see the terminal's Ctrl-C: the launcher passes it on. torch's agent answered a
    second press with SIGTERM, which the ranks took for a first stop request: they went on and saved."""
    code, out = ctrl_c(data, tmp_path, presses=2, command=launcher_command)
    assert code == 130, out[-3000:]
    assert "second interrupt: exiting now, without saving" in out and "saved checkpoint" not in out, out[-3000:]
    assert not (tmp_path / "runs" / NAME / "checkpoints" / "latest").exists()


def test_a_plain_python_launch_trains_as_one_process_and_resumes(interrupted, resumed):
    proc, stopped = resumed
    assert "world 1 = TP1 x PP1 x DP1" in proc.stdout
    assert f"resumed from runs/{NAME}/checkpoints/iter_{stopped:07d} at step {stopped}" in proc.stdout
    rows = [json.loads(line) for line in open(interrupted[0] / "runs" / NAME / "metrics.jsonl")]
    assert sorted(r["step"] for r in rows if "last_loss" in r) == list(range(1, stopped + 3))


def test_step_lines_carry_tokens_elapsed_time_and_eta(resumed):
    proc, stopped = resumed
    last = next(line for line in proc.stdout.splitlines() if line.startswith(f"step {stopped + 2:>6}/"))
    tokens = (stopped + 2) * 8 * 64  # global batch 8 x seq 64
    assert f"| {tokens:,} tokens | elapsed " in last and last.endswith("ETA 0s"), last


def test_the_run_ends_with_a_summary_naming_the_checkpoint_and_what_comes_next(interrupted, resumed):
    proc, stopped = resumed
    step = stopped + 2
    lines = proc.stdout.rstrip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("finished: "))
    assert lines[head].startswith(f"finished: step {step}/{step}, {step * 8 * 64:,} tokens, ")
    rows = [r for r in map(json.loads, open(interrupted[0] / "runs" / NAME / "metrics.jsonl")) if "last_loss" in r]
    # the train loss is the last logged window's mean (log_interval 1 here: that step's), and says so
    assert f"train loss {rows[-1]['loss']:.4f} (step {step}), validation loss " in lines[head], lines[head]
    assert "tokens, the whole set)" in lines[head]
    summary = "\n".join(lines[head:])
    assert f"  checkpoint  runs/{NAME}/checkpoints/iter_{step:07d}" in summary
    assert f"  metrics     runs/{NAME}/metrics.jsonl" in summary
    assert (f"  export      python tools/convert_checkpoint_to_hf.py --checkpoint runs/{NAME}/checkpoints "
            f"--output runs/{NAME}/hf") in summary
    assert f"  evaluate    python tools/evaluate.py runs/{NAME}/hf --perplexity " in summary
    assert len(lines) - head <= 8  # the summary is the end of the output


def test_output_folders_default_to_the_run_name():
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config("tiny_cpu", ["name=vim_rf"])
    assert (cfg.logging.dir, cfg.checkpoint.dir) == ("runs/vim_rf", "runs/vim_rf/checkpoints")
    cfg = load_run_config("tiny_cpu", ["name=vim_rf", "logging.dir=/scratch/x"])  # checkpoints follow the logs
    assert cfg.checkpoint.dir == "/scratch/x/checkpoints"
    assert load_run_config("tiny_cpu", ["checkpoint.dir=null"]).checkpoint.dir is None


def test_launcher_prints_a_ranks_config_error_in_one_line_and_exits_2(data, tmp_path):
    """Our launcher, 2 processes, a typo'd option: the rank's one `error:` line, none of torchrun's report."""
    proc = subprocess.run([sys.executable, "-m", "rf_megatron.launch", "--nproc-per-node", "2", str(TRAIN),
                           "--config", "tiny_cpu", *overrides(data, tmp_path), "train.train_stepz=3"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == ["error: unknown option train.train_stepz (did you mean train.train_steps?)"], lines


def test_a_config_error_is_said_when_rank_0_starts_last(data, tmp_path):
    """Rank 0 says a config error (the same on every rank). When another rank reaches it first (here rank 0 starts
    15 s late) and exits, the launcher ends the job: rank 0 must not be killed before its line is out (CI saw no
    line at all; so did this test on the previous commit)."""
    proc = subprocess.run([sys.executable, "-m", "rf_megatron.launch", "--nproc-per-node", "2",
                           str(REPO / "tests" / "dist" / "slow_rank0.py"), "15", str(TRAIN),
                           "--config", "tiny_cpu", *overrides(data, tmp_path), "train.train_stepz=3"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == ["error: unknown option train.train_stepz (did you mean train.train_steps?)"], lines


def launch(*args, cwd=REPO):
    """Our launcher with these arguments: (exit code, the non-blank lines it and its ranks printed)."""
    proc = subprocess.run([sys.executable, "-m", "rf_megatron.launch", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("options, error", [
    (["--nproc-per-node", "two"], "error: Unsupported nproc_per_node value: two"),
    (["--num-procs", "2"], "error: unrecognized arguments: --num-procs"),
    (["--nnodes", "2:1"], "error: min_nodes must be > 0 and <= max_nodes, got min_nodes=2, max_nodes=1"),
])
def test_a_wrong_launcher_option_is_one_error_line(options, error):
    code, lines = launch(*options, TRAIN, "--config", "tiny_cpu")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(error), lines


def test_a_mistyped_script_is_one_error_line_and_starts_nothing():
    code, lines = launch("--nproc-per-node", "2", "pretrain/pretrain_resformr.py", "--config", "tiny_cpu")
    assert (code, lines) == (2, ["error: pretrain/pretrain_resformr.py: no such file"]), lines


def test_an_unknown_script_option_is_said_once_under_the_launcher():
    code, lines = launch("--nproc-per-node", "2", TRAIN, "--config", "tiny_cpu", "--bogus-flag")
    assert code == 2 and lines == ["error: unrecognized arguments: --bogus-flag (--help lists the options)"], lines
