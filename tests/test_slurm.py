"""slurm/ job scripts against a REAL SLURM: slurmctld plus two emulated compute nodes (two slurmd)
on this machine, started by slurm/local-cluster/start.sh (which apt-installs SLURM if needed).

Jobs train the tiny model for real: a 2-node x 2-task TP2 x DP2 job; the DeepSpeed engine's job; a job that gets SLURM's
time-limit warning (--signal=B:USR1@T), checkpoints, requeues itself and resumes to the same losses
as an uninterrupted job; a throttled array sweep; a crash loop stopped by the max-restarts guard;
and the one-line pre-flight errors.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, build_tiny_corpus  # noqa: E402
SLURM = REPO / "slurm"
START, STOP = SLURM / "local-cluster" / "start.sh", SLURM / "local-cluster" / "stop.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


# --- cluster and data ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    installed = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if os.geteuid() != 0:
        pytest.skip("starting SLURM's daemons (and apt-get install) needs root")
    if not installed and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    was_up = installed and subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0
    env = {**os.environ, "NODES": "2", "CPUS": "4", "REQUEUE_DELAY": "10"}
    proc = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"slurm/local-cluster/start.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                    pytrace=False)
    yield
    if not was_up:
        subprocess.run(["bash", str(STOP)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shared tiny corpus, tokenizer and indexed dataset."""
    return build_tiny_corpus(tmp_path_factory.mktemp("slurm_data"))


def overrides(data, steps=12, **extra):
    base = {
        "data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model",
        "data.cache_dir": data / "cache", "data.split": "90,10,0",
        "model.num_layers": 4, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.ffn_hidden_size": 128, "model.vocab_size": 512, "model.seq_length": 64,
        "train.train_steps": steps, "train.global_batch_size": 8, "train.micro_batch_size": 2,
        "train.log_interval": 1, "train.eval_interval": 0, "train.eval_steps": 1,
        "optim.lr_warmup_steps": 2, "optim.lr": 0.003, "checkpoint.save_interval": 0,
        "logging.wandb_project": "null", "parallel.tensor_parallel": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def job_env(runs, **extra):
    return {**os.environ, "RF_PYTHON": sys.executable, "RF_REPO": str(REPO), "RF_RUNS": str(runs),
            "RF_MEGATRON_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RF_SIGNAL_RESEND": "2",
            **{k: str(v) for k, v in extra.items()}}


# --- SLURM helpers -------------------------------------------------------------------------------------

def sbatch(script, *args, env, sbatch_args=()):
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(SLURM / script), *map(str, args)],
                          env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def jobs(job_id):
    """`scontrol show job` records of a job (one per array task), as dicts of the fields we read."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    out = []
    for line in proc.stdout.splitlines():
        rec = {}
        for key in ("JobId", "ArrayJobId", "ArrayTaskId", "JobState", "Reason", "Restarts", "ExitCode", "NodeList", "NumTasks",
                    "RunTime", "StdOut", "ArrayTaskThrottle"):
            m = re.search(rf"(?:^|\s){key}=(\S*)", line)
            if m:
                rec[key] = m.group(1)
        out.append(rec)
    return out


def log_text(rec):
    path = Path(rec.get("StdOut", ""))
    return path.read_text(errors="replace") if path.is_file() else ""


# Start a requeued job at once instead of after SLURM's requeue delay (the credential lifetime).
# Not literally "now": a relaunch within the second of the requeue fails with "Job credential
# revoked" (slurmd compares times in whole seconds) and the job ends FAILED.
START_SOON = "now+3"


def wait_jobs(job_id, timeout=420, on_requeue=None, poll=None):
    """Wait until every record of the job is in a final state; start requeued runs soon."""
    deadline, restarts = time.time() + timeout, 0
    while True:
        recs = jobs(job_id)
        if recs and all(r.get("JobState") in TERMINAL for r in recs):
            return recs
        for r in recs:
            if r.get("JobState") == "PENDING" and int(r.get("Restarts", 0)) > restarts:
                restarts = int(r["Restarts"])
                # an array task by ArrayJobId_TaskId: the last task's JobId is the whole array's
                me = f"{r['ArrayJobId']}_{r['ArrayTaskId']}" if "ArrayTaskId" in r else r["JobId"]
                (on_requeue or (lambda j: scontrol_update(j, StartTime=START_SOON)))(me)
        if poll:
            poll(recs)
        if time.time() > deadline:
            subprocess.run(["scancel", str(job_id)])
            tails = "\n".join(log_text(r)[-3000:] for r in recs)
            pytest.fail(f"job {job_id} not done after {timeout}s: {recs}\n{tails}", pytrace=False)
        time.sleep(0.5)


def scontrol_update(job_id, **fields):
    proc = subprocess.run(["scontrol", "update", f"JobId={job_id}", *(f"{k}={v}" for k, v in fields.items())],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def assert_completed(rec):
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), f"{rec}\n{log_text(rec)[-4000:]}"


def metrics(log_dir):
    rows = [json.loads(line) for line in open(Path(log_dir) / "metrics.jsonl")]
    return {r["step"]: r["last_loss"] for r in rows if "last_loss" in r}, [r["valid_loss"] for r in rows
                                                                           if "valid_loss" in r]


def trainer_processes(marker):
    """The main trainer process of every rank whose command line mentions `marker`."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if len(cmd) > 1 and cmd[1].endswith("pretrain_resformer.py") and any(marker in c for c in cmd):
            procs.append(p)
    return procs


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# --- tests ----------------------------------------------------------------------------------------------

def test_two_nodes_tp2_dp2(cluster, data, tmp_path):
    """slurm/submit.py: 2 emulated nodes x 2 srun tasks = world 4, TP2 x DP2, rendezvous on n1."""
    proc = subprocess.run([sys.executable, str(SLURM / "submit.py"), "--gpus-per-node", "0", "--nodes", "2", "--ntasks-per-node", "2",
                           "--time", "10", "--exp", "tp2dp2", "--runs", str(tmp_path), "--python", sys.executable,
                           "tiny_cpu", *overrides(data)], env=job_env(tmp_path), cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    (rec,) = wait_jobs(job)
    assert_completed(rec)
    assert rec["NodeList"] == "n[1-2]" and rec["NumTasks"] == "4" and rec["Restarts"] == "0"
    assert rec["StdOut"] == str(tmp_path / "tp2dp2" / f"slurm-{job}.out")
    log = log_text(rec)
    assert "world 4 = TP2 x PP1 x DP2" in log and f"rendezvous n1:{20000 + int(job) % 10000}" in log, log[-3000:]
    losses, valid = metrics(tmp_path / "tp2dp2")
    assert sorted(losses) == list(range(1, 13)) and len(valid) == 1
    assert losses[12] < losses[1] - 0.5
    assert (tmp_path / "tp2dp2" / "checkpoints" / "latest").read_text() == "iter_0000012"


def test_deepspeed_engine_on_two_nodes_requeues_resumes_and_writes_hf(cluster, data, tmp_path):
    """RF_ENGINE=deepspeed (submit.py --engine): the HF model with ZeRO-2 on 2 nodes x 1 srun task; the
    run stops cleanly at step 4 (train.exit_interval), the job requeues itself and resumes to the end."""
    proc = subprocess.run([sys.executable, str(SLURM / "submit.py"), "--gpus-per-node", "0", "--engine", "deepspeed", "--nodes", "2",
                           "--ntasks-per-node", "1", "--time", "10", "--exp", "ds", "--runs", str(tmp_path),
                           "--python", sys.executable, "tiny_cpu", *overrides(data, steps=8),
                           "train.exit_interval=4", "deepspeed.config=zero2"],
                          env=job_env(tmp_path), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    (rec,) = wait_jobs(job)
    assert_completed(rec)
    log = log_text(rec)
    assert rec["NodeList"] == "n[1-2]" and rec["Restarts"] == "1", f"{rec}\n{log[-3000:]}"
    assert "DeepSpeed ZeRO-2 on 2 process(es) (cpu, fp32)" in log, log[-3000:]
    assert "requeueing (restart 1 of at most 10); the next run resumes from step 4" in log
    assert re.search(r"resumed from \S+iter_0000004 at step 4\b", log), log[-3000:]
    losses, valid = metrics(tmp_path / "ds")
    assert sorted(losses) == list(range(1, 9)) and len(valid) == 1
    assert (tmp_path / "ds" / "checkpoints" / "latest").read_text() == "iter_0000008"
    assert json.loads((tmp_path / "ds" / "hf" / "config.json").read_text())["variant"] == "resformer"


def test_time_limit_checkpoints_requeues_and_resumes_exactly(cluster, data, tmp_path):
    """SLURM's own time-limit warning (--signal=B:USR1@140) reaches the trainer mid-run: it saves,
    the job requeues itself and resumes from the checkpoint; every loss equals the uninterrupted
    job's. SLURM checks time limits only every 30 s, longer than this tiny run takes, so while the
    warning is pending the trainer processes are frozen (SIGSTOP) as if each step were slow; a
    periodic checkpoint (save_interval=4) exists before the stop, so the checkpoint writer's helper
    process is alive when the stop request comes (it must survive it)."""
    steps = 16
    args = ("tiny_cpu", *overrides(data, steps=steps, **{"checkpoint.save_interval": 4}))
    common = ["--nodes=2", "--ntasks-per-node=1", "--time=10", f"--output={tmp_path}/job-%j.out"]
    ref = sbatch("pretrain.sbatch", *args, env=job_env(tmp_path, RF_EXP="ref"), sbatch_args=common)
    job = sbatch("pretrain.sbatch", *args, env=job_env(tmp_path, RF_EXP="cut"),
                 sbatch_args=[*common, "--signal=B:USR1@140"])
    cut = tmp_path / "cut"
    try:
        wait_for(lambda: (cut / "metrics.jsonl").exists() and len((cut / "metrics.jsonl").read_text().splitlines()) >= 5,
                 300, "the job to train 5 steps")
        procs = trainer_processes(str(cut / "checkpoints"))
        assert len(procs) == 2, procs
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        try:
            # time limit -> now + 75..135 s: the USR1 warning (140 s before the end) is due at once;
            # SLURM sends it at its next time-limit check (<= 30 s), leaving >= 45 s to save
            (rec,) = jobs(job)
            d, h, m, s = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)", rec["RunTime"]).groups()
            elapsed = 86400 * int(d or 0) + 3600 * int(h) + 60 * int(m) + int(s)
            scontrol_update(job, TimeLimit=math.ceil((elapsed + 75) / 60))
            wait_for(lambda: "got SIGUSR1" in log_text(jobs(job)[0]), 90, "SLURM's time-limit warning")
        finally:
            for p in procs:
                p.send_signal(signal.SIGCONT)
        # the requeued run gets a long time limit again (and starts now instead of after the delay)
        (rec,) = wait_jobs(job, on_requeue=lambda j: scontrol_update(j, TimeLimit=10, StartTime=START_SOON))
        (ref_rec,) = wait_jobs(ref)
    finally:
        subprocess.run(["scancel", ref, job], capture_output=True)
    assert_completed(rec)
    assert_completed(ref_rec)
    assert rec["Restarts"] == "1", rec
    log = log_text(rec)
    stopped = int(re.search(r"signal SIGUSR1: saving at step (\d+) and exiting", log).group(1))
    assert 5 <= stopped < steps, log[-3000:]
    assert f"requeueing (restart 1 of at most 10); the next run resumes from step {stopped}" in log
    assert re.search(rf"resumed from \S+iter_{stopped:07d} at step {stopped}\b", log), log[-3000:]
    want, want_valid = metrics(tmp_path / "ref")
    got, got_valid = metrics(cut)
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s] == pytest.approx(want[s], rel=0, abs=1e-6), (s, got[s], want[s])
    assert got_valid == pytest.approx(want_valid, rel=0, abs=1e-6)


def test_scancel_with_wandb_on_still_saves(cluster, data, tmp_path):
    """A plain `scancel` (SIGTERM to every process of the step, wandb's service process included) with wandb on,
    as in the presets: the trainer saves the step it is on; a wandb that dies with the job is dropped with a
    warning instead of taking the checkpoint with it (issue #18)."""
    # periodic checkpoints, as in a real run: the first save (which starts dist_checkpointing's helper processes)
    # is behind us when scancel comes, so the stop's save fits in SLURM's KillWait even on a loaded CI machine
    args = ("tiny_cpu", *overrides(data, steps=400, **{"logging.wandb_project": "rf-test", "checkpoint.save_interval": 2}))
    job = sbatch("pretrain.sbatch", *args, env=job_env(tmp_path, RF_EXP="cancelled"),
                 sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--time=10", f"--output={tmp_path}/job-%j.out"])
    run = tmp_path / "cancelled"
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3,
                 300, "the job to train 3 steps and save once")
        assert (run / "wandb").is_dir()  # wandb is really on
        subprocess.run(["scancel", job], check=True)
        (rec,) = wait_jobs(job, timeout=120)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = log_text(rec)
    stopped = int(re.search(r"signal SIGTERM: saving at step (\d+) and exiting", log).group(1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}", log[-3000:]
    assert 3 <= stopped < 400 and "Traceback" not in log, log[-3000:]


def test_sweep_array_throttled_each_task_writes_metrics(cluster, data, tmp_path):
    """slurm/submit.py --sweep: one array task per line, at most 2 at a time, own metrics each."""
    common = " ".join(overrides(data, steps=6, **{"parallel.tensor_parallel": 1}))
    lines = [f"tiny_cpu {common} model.variant=vanilla",
             f"tiny_cpu {common} model.variant=resformer model.lambda_mode=learnable",
             f"tiny_cpu {common} model.variant=resformer model.hidden_size=32 logging.dir={tmp_path}/h32"]
    sweep = tmp_path / "variants.txt"
    sweep.write_text("# preset + overrides, one configuration per line\n\n" + "\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, str(SLURM / "submit.py"), "--gpus-per-node", "0", "--sweep", str(sweep), "--max-parallel", "2",
                           "--runs", str(tmp_path / "runs"), "--python", sys.executable],
                          env=job_env(tmp_path / "runs"), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    running = []
    recs = wait_jobs(job, poll=lambda rs: running.append(sum(r.get("JobState") == "RUNNING" for r in rs)))
    assert sorted(int(r["ArrayTaskId"]) for r in recs) == [0, 1, 2], recs
    assert max(running) <= 2 and recs[0].get("ArrayTaskThrottle") == "2", (running, recs)
    for r in recs:
        assert_completed(r)
    dirs = [tmp_path / "runs" / "variants" / "0", tmp_path / "runs" / "variants" / "1", tmp_path / "h32"]
    finals = []
    for d, (variant, hidden) in zip(dirs, (("vanilla", 64), ("resformer", 64), ("resformer", 32))):
        losses, valid = metrics(d)
        assert sorted(losses) == list(range(1, 7)) and len(valid) == 1, d
        cfg = (d / "config.yaml").read_text()
        assert f"variant: {variant}" in cfg and f"hidden_size: {hidden}" in cfg, cfg
        finals.append(losses[6])
    assert len(set(finals)) == 3, finals  # three different models, not one config three times
    assert (tmp_path / "runs" / "variants" / "2" / "checkpoints" / "latest").exists()

    # the same sweep again: submit.py finds every run finished and submits nothing (no node held to say so)
    proc = subprocess.run([sys.executable, str(SLURM / "submit.py"), "--gpus-per-node", "0", "--sweep", str(sweep), "--max-parallel", "2",
                           "--runs", str(tmp_path / "runs"), "--python", sys.executable],
                          env=job_env(tmp_path / "runs"), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert [line.split(":")[0] for line in proc.stderr.splitlines()] == [
        "skipping configuration 0", "skipping configuration 1", "skipping configuration 2", "nothing to submit"], proc.stderr
    for d in dirs:
        losses, valid = metrics(d)
        assert sorted(losses) == list(range(1, 7)) and len(valid) == 1, d


def processes_of_job(job):
    """Every process on this machine (both emulated nodes) whose environment says it belongs to SLURM job `job`."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SLURM_JOB_ID") == str(job):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_kill_9_of_a_rank_leaves_no_process_of_the_job(cluster, data, tmp_path):
    """kill -9 of one rank after a checkpoint (dist_checkpointing's writer helpers are alive then): the job ends
    and nothing it started outlives it; the helpers used to be re-parented to PID 1 and keep the step's output
    open (issue #18)."""
    job = sbatch("pretrain.sbatch", "tiny_cpu", *overrides(data, steps=400, **{"checkpoint.save_interval": 2}),
                 env=job_env(tmp_path, RF_EXP="kill9", RF_MAX_RESTARTS=0),
                 sbatch_args=["--nodes=1", "--ntasks-per-node=2", f"--output={tmp_path}/job-%j.out"])
    ckpt = tmp_path / "kill9" / "checkpoints"
    try:
        wait_for(lambda: (ckpt / "latest").exists(), 300, "the first checkpoint")
        ranks = trainer_processes(str(ckpt))
        assert len(ranks) == 2, ranks
        helpers = [c for r in ranks for c in r.children(recursive=True)]
        assert helpers, "no checkpoint-writer helper process to check"
        ranks[1].kill()
        (rec,) = wait_jobs(job, timeout=120)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert rec["JobState"] == "FAILED", f"{rec}\n{log_text(rec)[-3000:]}"
    wait_for(lambda: not processes_of_job(job), 15, f"the processes of job {job} to end: {processes_of_job(job)}")


def test_crash_loop_stops_at_max_restarts(cluster, data, tmp_path):
    """Ranks that keep crashing: requeued up to RF_MAX_RESTARTS times, then the job fails."""
    fake = tmp_path / "crashing-python"
    fake.write_text(f'#!/bin/sh\n# the pre-flight check runs for real; every rank "crashes"\n'
                    f'[ -n "$RANK" ] && {{ echo "rank $RANK: simulated crash" >&2; exit 3; }}\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    job = sbatch("pretrain.sbatch", "tiny_cpu", *overrides(data),
                 env=job_env(tmp_path, RF_EXP="crash", RF_PYTHON=fake, RF_MAX_RESTARTS=1),
                 sbatch_args=["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out"])
    (rec,) = wait_jobs(job, timeout=240)
    log = log_text(rec)
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("FAILED", "1:0", "1"), f"{rec}\n{log[-3000:]}"
    # exit 3 from the rank that crashed first, 143 if srun --kill-on-bad-exit ended the other one first, or 255 if
    # slurmstepd reports that task as lost while srun terminates the step (seen once in CI)
    assert re.search(r"training crashed \(exit (3|143|255)\); last logged step none, latest checkpoint step 0 \(this run "
                     r"started at step 0\): requeueing \(restart 1 of at most 1\)", log), log
    assert "already restarted 1 times (RF_MAX_RESTARTS=1): giving up" in log


def test_an_error_line_from_the_trainer_fails_the_job_without_a_requeue(cluster, data, tmp_path):
    """Exit 2 after launch (an error only a launched run finds, e.g. a checkpoint dir another run holds): the same
    line would come after every requeue."""
    fake = tmp_path / "refusing-python"
    fake.write_text(f'#!/bin/sh\n# the pre-flight check runs for real; the rank says an error line\n'
                    f'[ -n "$RANK" ] && {{ echo "error: simulated refusal" >&2; exit 2; }}\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    job = sbatch("pretrain.sbatch", "tiny_cpu", *overrides(data, **{"parallel.tensor_parallel": 1}),
                 env=job_env(tmp_path, RF_EXP="refused", RF_PYTHON=fake, RF_MAX_RESTARTS=3),
                 sbatch_args=["--nodes=1", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out"])
    (rec,) = wait_jobs(job, timeout=120)
    log = log_text(rec)
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("FAILED", "2:0", "0"), f"{rec}\n{log[-3000:]}"
    assert "error: simulated refusal" in log and "not requeueing: fix it and resubmit" in log, log
    assert "requeueing (restart" not in log, log


def test_an_error_line_from_a_job_of_several_ranks_fails_it_without_a_requeue(cluster, data, tmp_path):
    """The real trainer on 2 nodes x 1 task, a real compiler failure (inductor's C++ compiler is /bin/false) at the
    first step: rank 0 says it and exits 2 while rank 1 waits for that (rf_megatron/entry_point.py), so srun
    --kill-on-bad-exit ends rank 1 and reports its 143, not the 2; the job used to be requeued on that."""
    env = job_env(tmp_path, RF_EXP="refused2", RF_MAX_RESTARTS=2, CXX="/bin/false",
                  TORCHINDUCTOR_CACHE_DIR=tmp_path / "inductor-cache")
    job = sbatch("pretrain.sbatch", "tiny_cpu", *overrides(data, **{"parallel.compile_layers": "true"}), env=env,
                 sbatch_args=["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out"])
    (rec,) = wait_jobs(job, timeout=240)
    log = log_text(rec)
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("FAILED", "2:0", "0"), f"{rec}\n{log[-3000:]}"
    assert log.count("error: torch.compile failed") == 1, log
    assert "not requeueing: fix it and resubmit" in log and "requeueing (restart" not in log, log
    assert not list((tmp_path / "refused2").glob(".*")), "a mark file of the job was left in the run's folder"


def test_preflight_errors_are_one_line_and_launch_nothing(cluster, data, tmp_path):
    def submit(*args, nodes=1, tasks=2):
        return subprocess.Popen([sys.executable, str(SLURM / "submit.py"), "--gpus-per-node", "0", "--nodes", str(nodes),
                                 "--ntasks-per-node", str(tasks), "--runs", str(tmp_path / "runs"), *map(str, args)],
                                env=job_env(tmp_path / "runs"), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = {
        "error: config 'no_such_preset' is neither a YAML file nor a preset (": submit("no_such_preset"),
        f"error: checkpoint.dir={blocker}/ckpt is not writable (Not a directory)":
            submit("tiny_cpu", *overrides(data), f"checkpoint.dir={blocker}/ckpt"),
        "error: world size 3 (1 node(s) x 3 task(s)) is not divisible by "
        "tensor_parallel*pipeline_parallel*context_parallel=2": submit("tiny_cpu", *overrides(data), tasks=3),
        # what the partition can never run used to pend forever (issue #18)
        "error: --nodes 4: partition debug has 2 node(s)": submit("tiny_cpu", *overrides(data), nodes=4, tasks=1),
        "error: --ntasks-per-node 8: the nodes of partition debug have at most 4 CPUs":
            submit("tiny_cpu", *overrides(data), tasks=8),
        "error: --gpus-per-node 2: the nodes of partition debug have 0 GPU(s) (a CPU-only partition: --gpus-per-node 0)":
            submit("--gpus-per-node", "2", "tiny_cpu", *overrides(data)),
        "error: --signal-seconds 300 (the default) is more than half of --time 2 (120 s)":
            submit("--time", "2", "tiny_cpu", *overrides(data)),
    }
    dry = submit("--dry-run", "tiny_cpu", *overrides(data))
    # the same check inside the batch script, for jobs submitted with plain sbatch
    job = sbatch("pretrain.sbatch", "tiny_cpu", *overrides(data), env=job_env(tmp_path, RF_EXP="bad"),
                 sbatch_args=["--nodes=1", "--ntasks-per-node=3", f"--output={tmp_path}/job-%j.out"])
    for want, proc in cases.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == "", (out, err)
        assert err.count("\n") == 1 and err.startswith(want), err
    (rec,) = wait_jobs(job, timeout=120)
    log = log_text(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "2:0"), f"{rec}\n{log}"
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == ["error: world size 3 (1 node(s) x 3 task(s)) is not divisible by "
                      "tensor_parallel*pipeline_parallel*context_parallel=2"], log
    assert "rendezvous" not in log and "nothing was launched" in log
    out, err = dry.communicate(timeout=120)
    assert dry.returncode == 0 and "sbatch --parsable" in out, err
    assert not (tmp_path / "runs").exists()  # neither the refusals nor --dry-run left directories behind


# --- submit.py on the submit host, in-process (no cluster, nothing trained) ---------------------------------

def _submit(capsys, *args):
    """slurm/submit.py's main(): (exit code, stdout, stderr). --dry-run and --no-check: nothing is submitted."""
    sys.path.insert(0, str(SLURM))
    import submit

    try:
        rc = submit.main(["--gpus-per-node", "0", "--dry-run", *map(str, args)])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_mistyped_submit_option_is_one_error_line(capsys):
    rc, out, err = _submit(capsys, "--nodez", "2", "tiny_cpu")
    assert rc == 2 and out == "" and err == "error: unrecognized arguments: --nodez (python slurm/submit.py --help)\n"


def test_signal_seconds_0_overrides_the_scripts_own_warning_and_says_what_the_limit_does(capsys):
    rc, out, err = _submit(capsys, "--no-check", "--time", "1", "--signal-seconds", "0", "tiny_cpu")
    assert rc == 0 and " --signal=B:USR1@0 " in out, out  # the command line overrides `#SBATCH --signal=B:USR1@300`
    assert err.startswith("note: --signal-seconds 0: no warning before the --time 1 limit;") and err.count("\n") == 1
    rc, out, err = _submit(capsys, "--no-check", "--signal-seconds", "60", "tiny_cpu")
    assert rc == 0 and " --signal=B:USR1@60 " in out and err == ""


def test_a_refused_default_signal_lead_says_it_is_the_default_and_how_to_change_it(capsys):
    rc, out, err = _submit(capsys, "--no-check", "--time", "2", "tiny_cpu")
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: --signal-seconds 300 (the default) is more than half of --time 2 (120 s)")
    assert err.rstrip().endswith("--signal-seconds N with N <= 60 (0: no warning)"), err
    rc, _, err = _submit(capsys, "--no-check", "--time", "2", "--signal-seconds", "90", "tiny_cpu")
    assert rc == 2 and err.startswith("error: --signal-seconds 90 is more than half"), err


def _finished_checkpoint(ckpt_dir, step):
    """A checkpoint directory whose latest checkpoint (with a manifest that verifies) is at `step`."""
    from rf_megatron.checkpoint_dir import write_manifest

    path = Path(ckpt_dir) / f"iter_{step:07d}"
    path.mkdir(parents=True)
    (path / "train_state.json").write_text(json.dumps({"step": step}))
    write_manifest(path)
    (Path(ckpt_dir) / "latest").write_text(path.name)


def test_finished_sweep_lines_are_left_out_before_sbatch(capsys, tmp_path):
    sweep = tmp_path / "s.txt"
    sweep.write_text("".join(f"tiny_cpu train.train_steps=6 model.hidden_size={h}\n" for h in (32, 64, 96, 128)))
    _finished_checkpoint(tmp_path / "runs" / "s" / "1" / "checkpoints", 6)
    _finished_checkpoint(tmp_path / "runs" / "s" / "2" / "checkpoints", 4)  # stopped early: still to train
    rc, out, err = _submit(capsys, "--no-check", "--runs", tmp_path / "runs", "--sweep", sweep, "--max-parallel", 2)
    assert rc == 0 and " --array=0,2-3%2 " in out, out
    assert err.startswith("skipping configuration 1: s-1: already finished (") and err.count("\n") == 1, err
    for i in (0, 2, 3):
        _finished_checkpoint(tmp_path / "runs" / "s" / str(i) / "checkpoints", 7 + i)
    rc, out, err = _submit(capsys, "--no-check", "--runs", tmp_path / "runs", "--sweep", sweep)
    assert rc == 0 and out == "" and err.splitlines()[-1] == f"nothing to submit: every configuration of {sweep} has finished"
    assert len(err.splitlines()) == 5, err


def test_the_example_sweep_file_parses_into_valid_configurations():
    """The docs' slurm/sweeps/tiny_variants.txt exists and each line is a valid run config."""
    from rf_megatron.run_config import load_run_config
    from rf_megatron.scaling.sweep import parse_line, run_lines

    lines = run_lines(SLURM / "sweeps" / "tiny_variants.txt")
    variants = [load_run_config(*parse_line(line)).model.variant for line in lines]
    assert variants == ["vanilla", "resformer", "svformer"]


def test_a_controller_that_does_not_answer_is_said_so(cluster, capsys, monkeypatch, tmp_path):
    """scontrol against a controller nobody runs (a slurm.conf naming a closed port): the error used to read
    '--partition None: slurm_load_partitions error: ...' for a partition nobody named, and --dry-run failed too."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=gone\nSlurmctldHost=localhost\nSlurmctldPort=6999\nAuthType=auth/munge\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    rc, out, err = _submit(capsys, "--no-check", "tiny_cpu")
    assert rc == 0 and "sbatch --parsable" in out, err
    assert err == ("note: the SLURM controller does not answer (slurm_load_partitions error: Unable to contact slurm "
                   "controller (connect failure)): the partition's limits are not checked\n"), err
    import submit  # on the path since _submit

    rc = submit.main(["--gpus-per-node", "0", "--no-check", "tiny_cpu"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err == (
        "error: the SLURM controller does not answer (slurm_load_partitions error: Unable to contact slurm controller "
        "(connect failure)): is slurmctld running? (scontrol ping)\n"), err
