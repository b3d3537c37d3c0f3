"""A user who `pip install`s rf-megatron (no clone, no editable install) gets the presets and the commands: the
package is built and installed into a folder of its own and `rf-train --config tiny_cpu` trains from another
working directory, importing the installed copy, not this checkout."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, build_tiny_corpus, free_port


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    source, target = tmp_path_factory.mktemp("source") / "rf-megatron", tmp_path_factory.mktemp("site")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "data", "build",
                                                                "*.egg-info", "__pycache__"))  # builds leave build/
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=600,
                          cwd=source.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def test_an_installed_package_carries_its_presets_and_runs_rf_train_anywhere(installed, tmp_path):
    (tmp_path / "data").mkdir()
    data = build_tiny_corpus(tmp_path / "data")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1", "RF_MEGATRON_CPU": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    where = subprocess.run([sys.executable, "-c", "import rf_megatron; print(rf_megatron.__file__)"], cwd=cwd,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    assert (installed / "rf_megatron" / "presets" / "tiny_cpu.yaml").is_file()
    overrides = [f"data.paths=[{data / 'corpus'}]", f"data.tokenizer_model={data / 'tok.model'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.split=90,10,0", "parallel.tensor_parallel=1",
                 "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
                 "model.ffn_hidden_size=64", "model.seq_length=32", "train.train_steps=2", "train.global_batch_size=4",
                 "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=0", "train.final_eval_full=false",
                 "optim.lr_warmup_steps=1", "logging.wandb_project=null", "name=installed"]
    proc = subprocess.run([str(installed / "bin" / "rf-train"), "--config", "tiny_cpu", *overrides], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(cwd / "runs" / "installed" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "last_loss" in r] == [1, 2]
    assert (cwd / "runs" / "installed" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"


def test_an_installed_package_holds_every_module_of_the_source_tree(installed):
    """find_packages installs only folders with an __init__.py: a subpackage without one (the DeepSpeed engine's
    `zero/` once) would be missing from a `pip install .` while every checkout-based test passed."""
    def modules(root):
        return sorted(str(p.relative_to(root)) for p in (root / "rf_megatron").rglob("*.py") if "__pycache__" not in p.parts)

    assert modules(installed) == modules(REPO)
