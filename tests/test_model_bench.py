"""The GPU benchmark script runs end to end on tiny CPU components (same code path)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_model_gpu_runs_tiny(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_model_gpu", "--tiny"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_model.json").read_text())
    assert not [row for row in rows if "error" in row], rows
    kinds = [(row["name"], row.get("model"), row.get("stage")) for row in rows]
    for expected in [("dit_forward", "plain", None), ("dit_forward", "ours", None), ("train_step", "plain", None),
                     ("train_step", "ours", 1), ("train_step", "ours", 2), ("generation", "plain", None),
                     ("generation", "ours", None)]:
        assert expected in kinds
    assert "| train_step |" in run.stdout
