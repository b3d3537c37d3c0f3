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
