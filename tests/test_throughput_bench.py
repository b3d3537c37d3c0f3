"""bench/throughput.py runs at the tiny shape and prints its side-by-side table (no timing asserts: CI's CPUs
are shared)."""
import os
import subprocess
import sys

from conftest import REPO


def test_throughput_bench_prints_every_path_and_ratio():
    proc = subprocess.run([sys.executable, "-W", "ignore", str(REPO / "bench" / "throughput.py"), "--shape", "tiny",
                           "--warmup", "0", "--rounds", "1"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RF_MEGATRON_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("| Megatron", "| HF"))]
    for engine, kernels in (("Megatron", ("sdpa", "unfused")), ("HF", ("sdpa",))):
        for variant in ("vanilla", "ResFormer identity", "SVFormer"):
            for kernel in kernels:
                assert any(row.startswith(f"| {engine}, {variant}, {kernel} | ") for row in rows), (engine, variant, kernel)
    assert len(rows) == 9 and not any("failed" in row for row in rows), proc.stdout
    assert any(row.startswith("| Megatron, vanilla, sdpa |") and row.endswith("| 1.00x |") for row in rows)
    ratios = [line for line in lines if line.startswith("Megatron sdpa / ")]
    assert len(ratios) == 6 and all(line.endswith("x") for line in ratios), ratios


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", str(REPO / "bench" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RF_MEGATRON_CPU": "1", "OMP_NUM_THREADS": "1"})


def test_throughput_ablations_change_one_step_option_per_row():
    """On the CPU the default loss is Megatron's (parallel.cross_entropy=auto), so the compiled one is a row; on a
    GPU it is the other way round, and Megatron's fused kernel (bf16) is a row too. Compiled layers: a row."""
    proc = run_bench("throughput.py", "--shape", "tiny", "--warmup", "0", "--rounds", "1", "--variants", "vanilla",
                     "--backends", "sdpa", "--no-hf", "--ablations")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Megatron's loss: Megatron CE unless a row says otherwise" in proc.stdout
    rows = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("| Megatron")]
    assert rows == ["| Megatron, vanilla, sdpa", "| Megatron, vanilla, sdpa, compiled layers",
                    "| Megatron, vanilla, sdpa, foreach AdamW", "| Megatron, vanilla, sdpa, compiled CE"], proc.stdout
    assert "failed" not in proc.stdout


def test_step_traffic_counts_each_paths_bytes_and_compares_them():
    proc = run_bench("step_traffic.py", "--shape", "tiny", "--top", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = [line for line in proc.stdout.splitlines() if line.startswith("## ")]
    assert [s.split(":")[0] for s in sections] == ["## Megatron sdpa, Megatron CE",
                                                   "## Megatron sdpa, torch CE (what compiled runs, eagerly)",
                                                   "## HF sdpa"]
    assert all("GiB outside matmuls and attention" in s and s.endswith(" ops") for s in sections)
    ratios = [line for line in proc.stdout.splitlines() if line.endswith("x") and " / HF sdpa" in line]
    assert len(ratios) == 3 and ratios[-1].endswith(": 1.00x"), proc.stdout
