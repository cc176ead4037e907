"""The GPU benchmark script runs end to end on tiny CPU components (same code path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_tiny(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert not [row for row in rows if "error" in row], rows
    kinds = {(row["name"], row.get("model"), row.get("path")) for row in rows}
    for expected in [
        ("train_step", "plain diffusers", "baseline"),
        ("train_step", "ours", "ours plain"),
        ("train_step", "ours", "+ compile (default)"),
        ("generation", "plain diffusers", "baseline"),
        ("generation", "ours", "ours plain"),
        ("generation", "ours", "+ step cache 0.1"),
    ]:
        assert expected in kinds, expected
    checks = [row for row in rows if row["name"] == "check"]
    assert checks and all(row.get("gradient_relative_error", 0) < 1e-4 for row in checks), checks
    assert {"data_per_sample", "per-clip", "batched"} <= {row["name"] for row in rows}
    assert "| train_step |" in run.stdout
