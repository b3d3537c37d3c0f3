"""Checkpoint faults and bad inputs that used to lose or misread data (issue #13): each becomes the right
behaviour or one `error:` line. One trained run (6 steps, checkpoints at 4 and 6) feeds every trainer case;
each case works on its own copy of the run directory."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, build_tiny_corpus, free_port

TRAIN = REPO / "pretrain" / "pretrain_resformer.py"
TRAIN_DS = REPO / "pretrain" / "pretrain_hf_deepspeed.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_corpus(tmp_path_factory.mktemp("data"))


def overrides(data, run, **extra):
    base = {
        "data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model",
        "data.cache_dir": data / "cache", "data.split": "90,10,0",
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 2,
        "model.ffn_hidden_size": 64, "model.vocab_size": 384, "model.seq_length": 32,
        "model.lambda_mode": "learnable",
        "train.train_steps": 6, "train.global_batch_size": 4, "train.micro_batch_size": 2,
        "train.log_interval": 1, "train.eval_interval": 0, "train.eval_steps": 1, "train.lambda_log_interval": 0,
        "optim.lr_warmup_steps": 1, "optim.lr": 3e-3,
        "checkpoint.dir": run / "ckpt", "checkpoint.save_interval": 2, "checkpoint.keep_last": 2,
        "logging.dir": run / "log", "logging.wandb_project": "null", "parallel.tensor_parallel": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(data, run, check=True, script=TRAIN, **extra):
    """One process, launched the way srun launches a task (rendezvous variables, no torchrun in between)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RF_MEGATRON_CPU": "1", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script), "--config", "tiny_cpu", *overrides(data, run, **extra)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def steps_logged(run):
    rows = [json.loads(line) for line in open(run / "log" / "metrics.jsonl")]
    return [r["step"] for r in rows if "last_loss" in r]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    train(data, run)
    return run


@pytest.fixture
def copy_of(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def test_the_trained_run_kept_its_last_two_checkpoints(trained):
    assert sorted(p.name for p in (trained / "ckpt").glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert (trained / "ckpt" / "latest").read_text() == "iter_0000006"
    states = [json.loads((trained / "ckpt" / n / "train_state.json").read_text()) for n in ("iter_0000004", "iter_0000006")]
    assert states[0]["run_id"] == states[1]["run_id"] and len(states[0]["run_id"]) == 12


def test_a_fresh_run_into_a_used_directory_refuses_and_deletes_nothing(data, copy_of):
    line = one_error_line(train(data, copy_of, check=False, **{"checkpoint.resume": "false", "train.train_steps": 2}))
    assert "holds checkpoints of an earlier run (iter_0000004, iter_0000006)" in line and "start_over" in line
    assert sorted(p.name for p in (copy_of / "ckpt").glob("iter_*")) == ["iter_0000004", "iter_0000006"]


def test_start_over_moves_the_old_checkpoints_aside(data, copy_of):
    proc = train(data, copy_of, **{"checkpoint.start_over": "true", "train.train_steps": 2})
    assert "moved the earlier checkpoints" in proc.stdout
    ckpt = copy_of / "ckpt"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000002"] and (ckpt / "latest").read_text() == "iter_0000002"
    (aside,) = ckpt.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) == ["health.json", "iter_0000004", "iter_0000006", "latest"]


def test_a_latest_pointer_to_a_missing_directory_is_one_line(data, copy_of):
    shutil.rmtree(copy_of / "ckpt" / "iter_0000006")
    line = one_error_line(train(data, copy_of, check=False))
    assert "latest names iter_0000006, which is incomplete or missing" in line
    assert "the newest other complete checkpoint is iter_0000004" in line


def test_resuming_with_another_model_is_refused_in_one_line_listing_the_changes(data, copy_of):
    line = one_error_line(train(data, copy_of, check=False, **{"train.train_steps": 8, "model.lambda_mode": "identity",
                                                              "model.num_layers": 4, "model.seq_length": 16}))
    assert "was trained with another model: model.num_layers 2 -> 4, model.lambda_mode 'learnable' -> 'identity';" in line
    assert "seq_length" not in line  # may change on resume


def test_kill_between_save_and_latest_resumes_with_one_curve_in_metrics(data, copy_of):
    """kill -9 after iter_6 was written but before `latest` moved: the run resumes from iter_4; the rows the
    interrupted run logged for steps 5-6 are dropped and logged again, so metrics.jsonl holds one curve."""
    (copy_of / "ckpt" / "latest").write_text("iter_0000004")
    with open(copy_of / "log" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.')  # a row cut off by the kill
    before = {r["step"]: r["last_loss"] for r in map(json.loads, open(copy_of / "log" / "metrics.jsonl").readlines()[:-1])
              if "last_loss" in r}
    proc = train(data, copy_of)
    assert "resumed from" in proc.stdout and re.search(r"dropped \d+ row\(s\) logged after step 4", proc.stdout)
    assert steps_logged(copy_of) == [1, 2, 3, 4, 5, 6]
    after = {r["step"]: r["last_loss"] for r in map(json.loads, open(copy_of / "log" / "metrics.jsonl")) if "last_loss" in r}
    assert after == pytest.approx(before, abs=0)  # resume is exact
    assert (copy_of / "ckpt" / "latest").read_text() == "iter_0000006"


def test_a_stop_without_checkpoint_dir_says_nothing_was_saved(data, tmp_path):
    proc = train(data, tmp_path, **{"checkpoint.dir": "null", "train.exit_interval": 2})
    assert "exiting at step 2 WITHOUT a checkpoint" in proc.stdout
    assert "rerun the same command to resume" not in proc.stdout


def test_deepspeed_refuses_a_fresh_run_into_a_used_directory(data, copy_of):
    line = one_error_line(train(data, copy_of, check=False, script=TRAIN_DS,
                                **{"checkpoint.resume": "false", "train.train_steps": 2}))
    assert "holds checkpoints of an earlier run" in line


# --- one run per checkpoint directory (rf_megatron/run_lock.py) ------------------------------------------------
def start(data, run, script=TRAIN, **extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RF_MEGATRON_CPU": "1", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return subprocess.Popen([sys.executable, str(script), "--config", "tiny_cpu", *overrides(data, run, **extra)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_started_together_in_one_checkpoint_dir_one_trains_the_other_is_refused(data, tmp_path):
    first = start(data, tmp_path / "a", **{"checkpoint.dir": tmp_path / "shared", "train.train_steps": 8})
    time.sleep(0.5)
    second = start(data, tmp_path / "b", **{"checkpoint.dir": tmp_path / "shared", "train.train_steps": 8})
    results = [(p.wait(timeout=600), *p.communicate()) for p in (first, second)]
    assert sorted(rc for rc, _, _ in results) == [0, 2], [(rc, err[-1500:]) for rc, _, err in results]
    _, _, err = next(r for r in results if r[0] == 2)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "is in use by another run (pid" in errors[0] and socket.gethostname() in errors[0], errors[0]
    assert not (tmp_path / "shared" / "run.lock").exists()  # released by the run that trained


def hold_lock_as_this_process(root):
    import psutil

    root.mkdir(parents=True, exist_ok=True)
    (root / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "pid_started": psutil.Process().create_time(), "since": "now"}))


@pytest.mark.parametrize("script, extra", [(TRAIN_DS, {"train.train_steps": 8}), (TRAIN, {"train.eval_only": "true"})],
                         ids=["deepspeed", "eval_only"])
def test_a_live_holder_of_the_lock_refuses_every_run_in_one_line(data, copy_of, script, extra):
    hold_lock_as_this_process(copy_of / "ckpt")  # this test process is the live holder
    line = one_error_line(train(data, copy_of, check=False, script=script, **extra))
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line and "run.lock" in line, line


# --- full and read-only disks: real small file systems (a tmpfs, a read-only bind mount) in a mount namespace ----
def in_mount_namespace(mounts: str, command, tmp_path, listing=None, env=None):
    """Run `command` after `mounts` (shell) in a private mount namespace (`unshare -rm`: no root needed where user
    namespaces are allowed, and nothing to unmount); `listing` (a dir inside a mount) is listed afterwards into
    tmp_path/listing.txt, since the mount goes with the namespace."""
    after = f'find "{listing}" > "{tmp_path / "listing.txt"}"; ' if listing else ""
    script = f'{mounts} || exit 97; "$@"; rc=$?; {after}exit $rc'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *map(str, command)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 97 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a small file system here: {proc.stderr.strip()[:200]}")
    return proc


def train_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RF_MEGATRON_CPU": "1", "RANK": "0",
            "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def error_lines(proc):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("size_kb, expected", [
    (400, ["no space left on the device", "step 2 was not saved (its partial iter_0000002.tmp removed)",
           "there is no earlier checkpoint"]),
    (1000, ["kB free, and the last checkpoint (iter_0000002) took 69", "step 4 was not saved;",
            "iter_0000002 is kept: make room and rerun the same command to resume from it"]),
], ids=["full-mid-write", "no-room-for-the-next"])
def test_a_checkpoint_dir_that_fills_up_stops_in_one_line_and_keeps_the_last_checkpoint(data, tmp_path, size_kb,
                                                                                      expected):
    ckpt = tmp_path / "small_disk"
    ckpt.mkdir()
    command = [sys.executable, TRAIN, "--config", "tiny_cpu",
               *overrides(data, tmp_path, **{"checkpoint.dir": ckpt})]
    proc = in_mount_namespace(f'mount -t tmpfs -o size={size_kb}k tmpfs "{ckpt}"', command, tmp_path, ckpt,
                              env=train_env())
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and all(e in errors[0] for e in expected), errors
    assert str(ckpt) in errors[0]
    left = {Path(p).name for p in (tmp_path / "listing.txt").read_text().split()}
    assert not [name for name in left if name.endswith(".tmp") or name == "run.lock"], left
    if size_kb == 1000:
        assert {"iter_0000002", "latest", "manifest.json"} <= left and "iter_0000004" not in left, left


def test_a_read_only_checkpoint_dir_is_one_line(data, copy_of, tmp_path):
    ckpt = copy_of / "ckpt"
    command = [sys.executable, TRAIN, "--config", "tiny_cpu", *overrides(data, copy_of, **{"train.train_steps": 8})]
    proc = in_mount_namespace(f'mount --bind "{ckpt}" "{ckpt}" && mount -o remount,bind,ro "{ckpt}"', command,
                              tmp_path, env=train_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and f"cannot write {ckpt}: the file system is read-only" in errors[0], errors


def test_the_converters_on_a_read_only_or_full_target_say_so_in_one_line(copy_of, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    export = [sys.executable, REPO / "tools" / "convert_checkpoint_to_hf.py", "--checkpoint", copy_of / "ckpt"]
    target = tmp_path / "target"
    target.mkdir()
    cases = {"read-only": (f'mount --bind "{target}" "{target}" && mount -o remount,bind,ro "{target}"',
                           "the file system is read-only"),
             "full": (f'mount -t tmpfs -o size=64k tmpfs "{target}"', "no space left on the device")}
    for mounts, why in cases.values():
        proc = in_mount_namespace(mounts, [*export, "--output", target / "hf"], tmp_path, target, env=env)
        errors = error_lines(proc)
        assert proc.returncode != 0 and len(errors) == 1 and f"cannot write {target}" in errors[0], proc.stderr[-2000:]
        assert why in errors[0] and "nothing was written to" in errors[0], errors
        assert (tmp_path / "listing.txt").read_text().split() == [str(target)]  # no leftovers
    hf = tmp_path / "hf"
    subprocess.run([*map(str, export), "--output", str(hf)], check=True, capture_output=True, cwd=REPO, env=env)
    proc = in_mount_namespace(cases["full"][0], [sys.executable, REPO / "tools" / "convert_hf_to_checkpoint.py",
                                                 "--hf", hf, "--output", target / "ckpt"], tmp_path, target, env=env)
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "no space left on the device" in errors[0], proc.stderr[-2000:]
    assert (tmp_path / "listing.txt").read_text().split() == [str(target)]


def test_the_lock_of_a_finished_run_is_gone(trained):
    assert not (trained / "ckpt" / "run.lock").exists()


# --- no process launch needed ---------------------------------------------------------------------------
def make_checkpoint(root, step, run_id):
    path = root / f"iter_{step:07d}"
    path.mkdir(parents=True)
    (path / "train_state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    return path


def test_pruning_keeps_other_lineages_and_newer_checkpoints(tmp_path):
    """The old bug: a fresh run's iter_10 next to an older run's iter_20/30 was pruned at once (sorted by name)."""
    from rf_megatron.checkpoint_dir import commit

    for step in (20, 30):
        make_checkpoint(tmp_path, step, "older")
    for step in (2, 4, 6, 10):
        make_checkpoint(tmp_path, step, "mine")
    commit(tmp_path, "iter_0000010", keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == [
        "iter_0000006", "iter_0000010", "iter_0000020", "iter_0000030"]
    assert (tmp_path / "latest").read_text() == "iter_0000010"


def test_pruning_keeps_the_newest_healthy_checkpoint(tmp_path):
    """A divergence rewinds to the newest healthy checkpoint, so pruning never removes it."""
    from rf_megatron.checkpoint_dir import commit

    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step, "mine")
    (tmp_path / "health.json").write_text(json.dumps({"iter_0000002": {"healthy": True},
                                                      "iter_0000004": {"healthy": False}}))
    commit(tmp_path, "iter_0000008", keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000006", "iter_0000008"]


def test_a_loss_spike_marks_the_checkpoint_before_it_unhealthy(tmp_path):
    from rf_megatron.checkpoint_health import HealthMonitor, newest_healthy, read_health

    monitor = HealthMonitor(tmp_path, spike_factor=3.0, writer=True)
    for step, loss in enumerate([6.0, 5.0, 4.0, 3.5], start=1):
        assert monitor.observe(step, loss, 1.0) is None
        make_checkpoint(tmp_path, step, "mine")
        monitor.saved(f"iter_{step:07d}")
    problem = monitor.observe(5, 15.0, 1.0)
    assert problem == "loss spike at step 5 (15 > 3 x the recent mean 4.625)"
    health = read_health(tmp_path)
    assert [health[f"iter_{s:07d}"]["healthy"] for s in (1, 2, 3, 4)] == [True, True, True, False]
    assert health["iter_0000004"]["why"] == problem
    assert newest_healthy(tmp_path).name == "iter_0000003"
    assert monitor.window_record() == {"finite": True, "max_loss": 15.0, "max_grad_norm": 1.0, "spikes": 1}


def test_a_divergence_names_the_newest_healthy_checkpoint_and_rewinding_skips_its_data(data, tmp_path):
    """lr=1e30: step 1 (lr 0 in warmup) leaves healthy weights, step 2 blows them up, step 3's gradients are not
    finite. iter_1 is judged healthy by step 2, iter_2 unhealthy by step 3; the stop message says so, and
    checkpoint.rewind_to_healthy resumes from iter_1, moving iter_2 aside and skipping the 2 batches of steps 2-3."""
    proc = train(data, tmp_path, check=False, **{"optim.lr": 1e30, "checkpoint.save_interval": 1})
    assert proc.returncode == 1, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error.endswith("stopping; the newest healthy checkpoint is iter_0000001: rerun with "
                          "checkpoint.rewind_to_healthy=true to resume from it skipping the data of steps 2-3 (and "
                          "lower optim.lr or check that data)"), error
    health = json.loads((tmp_path / "ckpt" / "health.json").read_text())
    assert health["iter_0000001"]["healthy"] is True
    assert health["iter_0000002"]["healthy"] is False and health["iter_0000002"]["why"].startswith("grad norm nan at step 3")
    state = json.loads((tmp_path / "ckpt" / "iter_0000002" / "train_state.json").read_text())
    assert state["health"]["finite"] is True and state["health"]["spikes"] == 0  # step 2 itself looked fine

    proc = train(data, tmp_path, **{"checkpoint.rewind_to_healthy": "true", "train.train_steps": 3})
    assert "checkpoint.rewind_to_healthy: resuming from iter_0000001" in proc.stdout, proc.stdout[-2000:]
    assert "skipping 2 global batch(es) (8 samples)" in proc.stdout
    assert [p.name.split("-")[1] for p in (tmp_path / "ckpt").glob("unhealthy-iter_*")] == ["iter_0000002"]
    rows = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    trained = {r["step"]: r for r in rows if "last_loss" in r}
    assert sorted(trained) == [1, 2, 3]
    assert trained[2]["consumed_samples"] == (1 + 2 + 1) * 4  # step 1, the 2 skipped batches, step 2
    assert all(abs(trained[s]["loss"]) < 10 for s in (2, 3))


@pytest.mark.parametrize("override, message", [
    ("train.loss_spike_factor=1", "train.loss_spike_factor=1.0 must be > 1 (or 0: no spike check)"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number >= 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be a finite number >= 0"),
    ("train.eval_interval=-5", "train.eval_interval=-5 must be >= 0"),
    ("checkpoint.save_interval=-2", "checkpoint.save_interval=-2 must be >= 0"),
    ("train.exit_duration_mins=-1", "train.exit_duration_mins=-1.0 must be positive"),
    ("train.exit_interval=0", "train.exit_interval=0 must be positive"),
])
def test_out_of_range_options_are_refused(override, message):
    from rf_megatron.config import ConfigError
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config("tiny_cpu", [override, "data.paths=[x]", "data.tokenizer_model=tok.model"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(2)
    # listed with the other problem of this config (tok.model is not there), in one line
    assert str(err.value).startswith("2 problems in the config: ") and f"; {message}" in str(err.value)


def test_a_damaged_latest_pointer_is_one_line_naming_the_checkpoint_to_use(data, copy_of):
    (copy_of / "ckpt" / "latest").write_bytes(b"\x00\xffnot a checkpoint\n")
    line = one_error_line(train(data, copy_of, check=False, **{"train.train_steps": 8}))
    assert "latest does not name a checkpoint" in line and "echo iter_0000006 >" in line, line


def damage_newest(copy_of, damage="truncated_distcp"):
    newest = copy_of / "ckpt" / "iter_0000006"
    if damage == "truncated_distcp":
        shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return shard.name
    (newest / ".metadata").unlink()
    return ".metadata"


def test_a_truncated_shard_is_named_and_the_run_falls_back_to_the_previous_checkpoint(data, copy_of):
    name = damage_newest(copy_of, "truncated_distcp")
    proc = train(data, copy_of)
    assert f"iter_0000006/{name}" in proc.stderr and "falling back to iter_0000004" in proc.stderr, proc.stderr
    assert "resumed from" in proc.stdout and "iter_0000004 at step 4" in proc.stdout
    assert steps_logged(copy_of) == [1, 2, 3, 4, 5, 6] and "Traceback" not in proc.stderr


def test_a_damaged_checkpoint_without_manifest_is_one_line(data, copy_of):
    """Checkpoints written before manifests existed: the load error is one line naming the checkpoint to use."""
    for path in (copy_of / "ckpt").glob("iter_*/manifest.json"):
        path.unlink()
    damage_newest(copy_of, "truncated_distcp")
    line = one_error_line(train(data, copy_of, check=False))
    assert "cannot load" in line and "iter_0000006" in line and "echo iter_0000004 >" in line, line


def test_a_flipped_byte_is_caught_and_the_run_falls_back_to_the_newest_good_checkpoint(data, copy_of):
    """One float changed inside a .distcp used to load silently (and the next save pruned the clean one)."""
    newest = copy_of / "ckpt" / "iter_0000006"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert {"train_state.json", "run_config.yaml", ".metadata"} <= set(manifest)
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    shard.write_bytes(bytes(raw))
    before = {r["step"]: r["last_loss"] for r in map(json.loads, open(copy_of / "log" / "metrics.jsonl"))
              if "last_loss" in r}
    proc = train(data, copy_of)
    assert f"{shard.name} does not match its checksum" in proc.stderr and "falling back to iter_0000004" in proc.stderr
    assert "resumed from" in proc.stdout and "iter_0000004 at step 4" in proc.stdout
    after = {r["step"]: r["last_loss"] for r in map(json.loads, open(copy_of / "log" / "metrics.jsonl")) if "last_loss" in r}
    assert after == before  # steps 5-6 trained again from the clean checkpoint: the same losses
    assert len(list((copy_of / "ckpt").glob("corrupt-iter_0000006-*"))) == 1


def test_the_exporter_refuses_a_damaged_checkpoint(copy_of):
    newest = copy_of / "ckpt" / "iter_0000006"
    (newest / "run_config.yaml").write_text((newest / "run_config.yaml").read_text() + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint_to_hf.py"), "--checkpoint",
                           str(copy_of / "ckpt"), "--output", str(copy_of / "hf")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "run_config.yaml has" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def one_document(data, tmp_path_factory):
    """A dataset preprocessed from one plain-text file: a single document."""
    root = tmp_path_factory.mktemp("one_doc")
    texts = [json.loads(line)["text"] for line in open(data / "corpus.jsonl")][:40]
    (root / "book.txt").write_text(" ".join(texts))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(root / "book.txt"),
                           "--tokenizer-model", str(data / "tok.model"), "--output-prefix", str(root / "book")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return root / "book"


def test_a_split_too_small_for_one_sample_is_one_line_not_a_hang(data, one_document, tmp_path):
    """One document with the default 98,1,1 split leaves validation and test empty: Megatron used to loop forever."""
    line = one_error_line(train(data, tmp_path, check=False, **{"data.paths": f"[{one_document}]",
                                                                 "data.split": "98,1,1"}))
    assert "data.split=98,1,1 gives the validation split 0 of its 1 document(s), 0 tokens" in line, line
    assert "--split-text-on-blank-lines" in line and "data.split=100,0,0" in line


def test_training_without_a_validation_split_works(data, one_document, tmp_path):
    proc = train(data, tmp_path, **{"data.paths": f"[{one_document}]", "data.split": "100,0,0",
                                    "train.eval_interval": 2, "train.train_steps": 4})
    assert "has no validation split: training without evaluation" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "last_loss" in r] == [1, 2, 3, 4] and not any("valid_loss" in r for r in rows)
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000004"


def test_kill_9_of_the_trainer_takes_its_helper_processes_along(data, tmp_path):
    """Checkpoint-writer helpers used to be re-parented to init and outlive a killed rank (holding a SLURM step's
    output open, so every requeue waited 60 s): they die with the trainer (issue #18)."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RF_MEGATRON_CPU": "1", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--config", "tiny_cpu", *overrides(
        data, tmp_path, **{"train.train_steps": 400, "checkpoint.save_interval": 1, "checkpoint.keep_last": 1})],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helpers = []
    try:
        deadline = time.time() + 300
        while not (tmp_path / "ckpt" / "iter_0000002").is_dir():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        helpers = psutil.Process(proc.pid).children(recursive=True)
        assert helpers, "no helper processes to check"
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(helpers, timeout=15)
        assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive]
    finally:
        proc.kill()
        for p in helpers:
            try:
                p.kill()
            except psutil.Error:
                pass


def plant_payload(ckpt, marker):
    """A `.metadata` that runs `touch marker` when unpickled, with the manifest rewritten to match (an attacker who
    can write the checkpoint can write its manifest too)."""
    import hashlib
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    raw = (ckpt / ".metadata").read_bytes()
    manifest["files"][".metadata"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_crafted_metadata_runs_nothing_on_resume_or_export(data, copy_of, tmp_path):
    marker = tmp_path / "payload-ran"
    plant_payload(copy_of / "ckpt" / "iter_0000006", marker)
    line = one_error_line(train(data, copy_of, check=False, **{"train.train_steps": 8}))  # resume: it must load
    assert "refusing to unpickle posix.system" in line and "iter_0000006/.metadata" in line, line
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint_to_hf.py"), "--checkpoint",
                           str(copy_of / "ckpt"), "--output", str(copy_of / "hf")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "refusing to unpickle posix.system" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def rewrite_manifest_entry(ckpt, name):
    """What an attacker who can write the checkpoint does after changing a file: the manifest is integrity (it
    catches accidents), not authenticity."""
    import hashlib

    manifest = json.loads((ckpt / "manifest.json").read_text())
    raw = (ckpt / name).read_bytes()
    manifest["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def payload(marker, size=None) -> bytes:
    """A pickle that runs `touch marker` when loaded unrestricted (torch.load reads a non-zip file as a legacy
    pickle), padded to `size` bytes."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    raw = pickle.dumps(Payload(), protocol=2)
    return raw if size is None else raw + b"\0" * (size - len(raw))


def plant_in_bytes_item(ckpt, marker) -> str:
    """Overwrite the first bytes item of the first .distcp (an `_extra_state` object) in place, same file length,
    and rewrite the manifest: returns the item's key."""
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # the test's own file: plain pickle is fine here
    items = sorted((info.relative_path, info.offset, info.length, index.fqn)
                   for index, info in metadata.storage_data.items()
                   if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata))
    file, offset, length, key = items[0]
    data = bytearray((ckpt / file).read_bytes())
    data[offset:offset + length] = payload(marker, length)
    (ckpt / file).write_bytes(bytes(data))
    rewrite_manifest_entry(ckpt, file)
    return key


def test_a_payload_in_a_distcp_bytes_item_runs_nothing_on_resume_export_or_analysis(data, copy_of, tmp_path):
    marker = tmp_path / "payload-ran"
    key = plant_in_bytes_item(copy_of / "ckpt" / "iter_0000006", marker)
    proc = train(data, copy_of, check=False, **{"train.train_steps": 8})  # resume: it must load
    assert not marker.exists()
    line = one_error_line(proc)
    assert "refusing to unpickle posix.system" in line and key in line, line
    for tool, args in (("convert_checkpoint_to_hf.py", ["--checkpoint", copy_of / "ckpt", "--output", copy_of / "hf"]),
                       ("analyze_attention.py", ["--checkpoint", copy_of / "ckpt", "--text", REPO / "README.md",
                                                 "--out", copy_of / "analysis"])):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode != 0 and "refusing to unpickle posix.system" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def test_dcp_itself_loads_bytes_items_restricted_once_installed(copy_of, tmp_path):
    """Defence in depth: whatever path reaches torch DCP's planner (not only our loaders' pre-check)."""
    import io

    import torch.distributed.checkpoint as dcp

    from rf_megatron.safe_checkpoint import install

    marker = tmp_path / "payload-ran"
    ckpt = copy_of / "ckpt" / "iter_0000006"
    key = plant_in_bytes_item(ckpt, marker)
    install()
    with pytest.raises(BaseException, match="refusing to unpickle posix.system"):
        dcp.load({key: io.BytesIO()}, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained_deepspeed(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained_ds")
    train(data, run, script=TRAIN_DS, **{"train.train_steps": 2})
    return run


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_payload_in_a_deepspeed_file_runs_nothing_on_resume(data, trained_deepspeed, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(trained_deepspeed, run)
    marker = tmp_path / "payload-ran"
    ckpt = run / "ckpt" / "iter_0000002"
    (ckpt / name).write_bytes(payload(marker))
    rewrite_manifest_entry(ckpt, name)
    proc = train(data, run, check=False, script=TRAIN_DS, **{"train.train_steps": 4})
    assert not marker.exists()
    line = one_error_line(proc)
    assert "refusing to unpickle posix.system" in line and name in line, line


def test_verification_names_a_missing_file_and_a_pointer_that_names_nothing(tmp_path):
    from rf_megatron.checkpoint_dir import CheckpointError, latest_checkpoint, verify_checkpoint, write_manifest

    ckpt = make_checkpoint(tmp_path, 6, "mine")
    (ckpt / ".metadata").write_bytes(b"meta")
    write_manifest(ckpt)
    assert verify_checkpoint(ckpt) is None
    (ckpt / ".metadata").unlink()
    assert verify_checkpoint(ckpt) == f"{ckpt / '.metadata'} is missing"
    for pointer in (b"", b"../../etc", b"iter_12x"):
        (tmp_path / "latest").write_bytes(pointer)
        with pytest.raises(CheckpointError, match="latest does not name a checkpoint"):
            latest_checkpoint(tmp_path)


def test_a_lock_whose_process_is_gone_is_taken_over_in_one_line(tmp_path):
    from rf_megatron import run_lock

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "then"}))
    said = []
    try:
        run_lock.acquire(tmp_path, say=said.append)
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        assert len(said) == 1 and "its process is gone" in said[0], said
    finally:
        run_lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    from rf_megatron import run_lock

    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "slurm_job": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    said = []
    try:
        run_lock.acquire(tmp_path, say=said.append)
        assert "this SLURM job, requeued" in said[0], said
    finally:
        run_lock.release()


def test_a_lock_held_on_another_node_by_another_job_is_refused(tmp_path, monkeypatch):
    from rf_megatron import run_lock

    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 7, "slurm_job": "1"}))
    monkeypatch.setenv("SLURM_JOB_ID", "2")
    with pytest.raises(run_lock.DirectoryInUse, match="pid 7 on node-elsewhere, SLURM job 1"):
        run_lock.acquire(tmp_path, say=print)


def test_a_plain_resume_of_an_unhealthy_checkpoint_says_so_and_names_the_rewind(tmp_path, capsys):
    from rf_megatron import run_lock
    from rf_megatron.resume import ResumeChecks
    from rf_megatron.run_config import load_run_config

    ckpt = make_checkpoint(tmp_path, 4, "mine")
    (tmp_path / "latest").write_text(ckpt.name)
    (tmp_path / "health.json").write_text(json.dumps({ckpt.name: {"healthy": False, "why": "loss nan at step 5"}}))
    checks = ResumeChecks()
    checks.cfg = load_run_config("tiny_cpu", [f"checkpoint.dir={tmp_path}"])
    checks.check_resumable = lambda path, state: None
    try:
        assert checks.find_resume_checkpoint().path == ckpt
    finally:
        run_lock.release()
    out = capsys.readouterr().err
    assert f"warning: {ckpt} is marked unhealthy" in out and "checkpoint.rewind_to_healthy=true" in out, out


def test_data_tokenized_with_another_tokenizer_is_refused_and_unrecorded_data_warned(data, tmp_path, capsys):
    """`data` was preprocessed with data/tok.model; a second tokenizer (another vocabulary) must not read it."""
    import sentencepiece as spm

    from rf_megatron.config import ConfigError
    from rf_megatron.data import check_data
    from rf_megatron.tokenizer import SentencePieceTokenizer

    own = SentencePieceTokenizer(data / "tok.model")
    check_data([str(data / "corpus")], 384, own)  # its own tokenizer: fine, silently
    assert capsys.readouterr().out == ""
    spm.SentencePieceTrainer.train(input=str(REPO / "README.md"), model_prefix=str(tmp_path / "other"), vocab_size=280,
                                   model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    other = SentencePieceTokenizer(tmp_path / "other.model")
    with pytest.raises(ConfigError, match=r"was tokenized with another tokenizer .*\(vocabulary 280\)"):
        check_data([str(data / "corpus")], 384, other)
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{data / 'corpus'}{suffix}", f"{tmp_path / 'unrecorded'}{suffix}")
    check_data([str(tmp_path / "unrecorded")], 384, own)
    assert "has no unrecorded.tokenizer.json" in capsys.readouterr().out


def test_a_disk_error_in_rank_0s_part_of_a_save_reaches_every_rank_instead_of_hanging_them(tmp_path):
    """run_config.yaml and train_state.json are rank 0's to write, after every rank's shards: on a 64 kB tmpfs a
    large run_config.yaml fails there alone. Every rank must raise it (the trainer then says one line); before, the
    other rank waited at the next barrier and died there with the collective's own error once rank 0 exited (NCCL
    can wait until its timeout instead). Nothing is committed."""
    import errno

    mount = tmp_path / "small"
    mount.mkdir()
    root = mount / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               "--master-addr=127.0.0.1", REPO / "tests" / "dist" / "land_checkpoint_run.py", root,
               "--config-bytes", 200_000]
    try:
        proc = in_mount_namespace(f'mount -t tmpfs -o size=64k tmpfs "{mount}"', ["timeout", "120", *command],
                                  tmp_path, listing=mount, env={**train_env(), "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        pytest.fail("a rank hung after rank 0's write failed")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert lines == [f"rank 0: OSError {errno.ENOSPC}", f"rank 1: OSError {errno.ENOSPC}"], proc.stdout
    listing = (tmp_path / "listing.txt").read_text()
    assert "latest" not in listing and "/ckpt/iter_0000001\n" not in listing, listing


def test_checkpoints_without_a_latest_pointer_say_how_to_resume_the_newest(tmp_path):
    """A deleted `latest` (or a kill during a run's first save) used to advise checkpoint.resume=true, which is what
    the run already had."""
    from rf_megatron.checkpoint_dir import prepare_fresh_run
    from rf_megatron.config import ConfigError

    for step in (8, 44):
        make_checkpoint(tmp_path, step, "mine")
    with pytest.raises(ConfigError) as err:
        prepare_fresh_run(tmp_path, start_over=False, rank0=True)
    assert str(err.value) == (
        f"checkpoint.dir={tmp_path} holds checkpoints (iter_0000008, iter_0000044) but no latest pointer names one (a "
        f"deleted latest, or a run killed during its first save): to resume the newest, echo iter_0000044 > "
        f"{tmp_path / 'latest'}; or point checkpoint.dir elsewhere, or set checkpoint.start_over=true to move them "
        "aside (nothing is deleted)")


def test_a_latest_pointer_to_a_missing_checkpoint_names_the_newest_complete_one_even_if_newer(tmp_path):
    from rf_megatron.checkpoint_dir import CheckpointError, latest_checkpoint

    for step in (8, 44):
        make_checkpoint(tmp_path, step, "mine")
    (tmp_path / "latest").write_text("iter_0000040")
    with pytest.raises(CheckpointError, match="the newest other complete checkpoint is iter_0000044: to resume from "
                                              "it, echo iter_0000044 > "):
        latest_checkpoint(tmp_path)


def test_eval_only_without_a_checkpoint_says_it_scores_the_initialisation(data, tmp_path):
    proc = train(data, tmp_path, **{"train.eval_only": "true"})
    out = proc.stdout + proc.stderr
    assert f"note: train.eval_only: no checkpoint in {tmp_path / 'ckpt'} to resume: scoring the initialisation" in out
    summary = out[out.index("evaluated: "):]
    assert summary.startswith("evaluated: step 0, ") and f"checkpoint  none (nothing saved in {tmp_path / 'ckpt'})" \
        in summary and "export" not in summary, summary
