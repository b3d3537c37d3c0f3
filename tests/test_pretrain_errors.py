"""Bad inputs to the trainer: one line on stderr naming the problem, exit code 2, no traceback."""
import os
import shutil
import subprocess
import sys

from conftest import REPO
from test_pretrain import data, overrides  # noqa: F401  (module-scoped data fixture)

TRAIN = REPO / "pretrain" / "pretrain_resformer.py"
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
ENV.update(RF_MEGATRON_CPU="1", PYTHONPATH=str(REPO))


def fails(data, tmp_path, *extra, env=None, **kw):
    args = overrides(data, tmp_path, **{"parallel.tensor_parallel": 1, **kw})
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", "tiny_cpu", *args, *extra],
                          capture_output=True, text=True, cwd=REPO, env={**ENV, **(env or {})},
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def copy_data(data, tmp_path):
    for ext in ("bin", "idx"):
        shutil.copy(data / f"corpus.{ext}", tmp_path / f"corpus.{ext}")
    return tmp_path / "corpus"


def test_config_typo_is_named_with_suggestion(data, tmp_path):
    assert "train.train_stepz (did you mean train.train_steps?)" in fails(data, tmp_path, "train.train_stepz=3")


def test_wrong_type_is_named(data, tmp_path):
    assert "model.hidden_size='big'" in fails(data, tmp_path, **{"model.hidden_size": "big"})


def test_batch_sizes_must_divide(data, tmp_path):
    assert "global_batch_size=7" in fails(data, tmp_path, **{"train.global_batch_size": 7})


def test_missing_data_path(data, tmp_path):
    assert "nowhere.idx" in fails(data, tmp_path, **{"data.paths": f"[{tmp_path / 'nowhere'}]"})


def test_truncated_bin(data, tmp_path):
    prefix = copy_data(data, tmp_path)
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(100)
    assert "corpus.bin" in fails(data, tmp_path, **{"data.paths": f"[{prefix}]"})


def test_corrupt_idx(data, tmp_path):
    prefix = copy_data(data, tmp_path)
    raw = bytearray(open(f"{prefix}.idx", "rb").read())
    raw[:4] = b"JUNK"
    open(f"{prefix}.idx", "wb").write(bytes(raw))
    assert "corpus.idx" in fails(data, tmp_path, **{"data.paths": f"[{prefix}]"})


def test_vocab_smaller_than_tokenizer(data, tmp_path):
    msg = fails(data, tmp_path, **{"model.vocab_size": 256})
    assert "model.vocab_size=256" in msg and "300" in msg


def test_two_independent_mistakes_are_both_reported_in_one_start(data, tmp_path):
    msg = fails(data, tmp_path, **{"model.num_attention_heads": 3, "optim.lr": -1})
    assert msg == ("error: 2 problems in the config: hidden_size=64 is not divisible by num_attention_heads=3; "
                   "optim.lr=-1.0 must be a finite number >= 0")


def test_unreadable_tokenizer(data, tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    assert "bad.model" in fails(data, tmp_path, **{"data.tokenizer_model": bad})


def test_unknown_preset(data, tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", "tiny_cpuu"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2 and "tiny_cpuu" in proc.stderr and "tiny_cpu" in proc.stderr


def test_a_failing_compiler_stops_compiled_layers_with_one_line(data, tmp_path):
    """A real compiler failure (inductor's C++ compiler is /bin/false, an empty compile cache) at the first step."""
    error = fails(data, tmp_path, env={"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")},
                  **{"parallel.compile_layers": "true"})
    assert "torch.compile failed" in error and "No working C++ compiler" in error, error
    assert error.endswith("set parallel.compile_layers=false"), error
