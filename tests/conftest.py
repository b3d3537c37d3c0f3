"""Shared test helpers: launching real multi-process gloo jobs."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rf_megatron.ports import free_port  # noqa: F401 (the tests' torchrun launches pick ports as the tools do)

REPO = Path(__file__).resolve().parents[1]


def torchrun(script, nproc: int, *args, timeout: int = 600, env=None, check=True):
    """Run `script` under torchrun with `nproc` CPU processes; return the CompletedProcess. A port that another
    process took between free_port() and torchrun's bind (EADDRINUSE: CI runs the SLURM tests alongside) is
    retried with another port, twice at most."""
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "OMP_NUM_THREADS": "1", "RF_MEGATRON_CPU": "1", **(env or {})}
    for _ in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(script), *map(str, args)]
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr:
            break
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}", pytrace=False)
    return proc


def assert_diverged_at_step_3(proc) -> None:
    """A run blown up by lr=1e30: stopped at step 3 with ONE `error:` line (rank 0), no stack trace of ours."""
    import re

    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0 says it; every rank stops
    assert re.search(r"grad norm is (nan|inf) at step 3 and the update was applied, so the weights are no longer "
                     r"finite: stopping; the newest healthy checkpoint is iter_0000001", errors[0]), errors[0]
    assert "TrainingStopped" not in proc.stderr


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Megatron-Core initialised in this process: CPU mode, gloo, world size 1 (TP1 PP1)."""
    import torch.distributed as dist

    from rf_megatron.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield parallel_state
    parallel_state.destroy_model_parallel()


def build_tiny_corpus(root: Path) -> Path:
    """A synthetic English-ish corpus -> SentencePiece tokenizer (tok.model, 300 pieces) -> Megatron
    indexed dataset (corpus.bin/.idx), through the real CLIs. Returns `root`."""
    rng = random.Random(0)
    words = ("the king queen lord lady sword castle night day love death heart blood crown fool wise speak "
             "thou thee art hath doth come go stay fair foul sweet gentle noble answer").split()
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(40, 200))) + "."}) + "\n")
    for tool, *args in (("train_tokenizer.py", "--input", root / "corpus.jsonl", "--vocab-size", "300",
                         "--output-prefix", root / "tok"),
                        ("preprocess_data.py", "--input", root / "corpus.jsonl", "--tokenizer-model",
                         root / "tok.model", "--output-prefix", root / "corpus")):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True,
                              text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
    return root


# The longest test files first: CI's pytest-xdist workers take whole files in this order (--dist loadfile), so the
# short ones fill the gaps at the end instead of one long file running alone (longest-first scheduling).
LONGEST_FIRST = ("test_pretrain.py", "test_deepspeed.py", "test_hf_conversion.py", "test_layout_equivalence.py",
                 "test_faults.py", "test_analysis.py", "test_validation.py", "test_device_placement.py",
                 "test_scaling.py", "test_slurm.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept inside a file
