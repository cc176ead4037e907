"""The GPU benchmark script runs end to end on tiny CPU components (same code path), and turns its
rows into docs/performance-results.json's figures (GPU runs only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_gpu import OURS_DEFAULT, OURS_EXACT, TRAIN_FLOW, merge_results, performance_results

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_tiny(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--tiny", "--docs", str(tmp_path / "docs")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert not [row for row in rows if "error" in row], rows
    kinds = {(row["name"], row.get("model"), row.get("path"), row.get("batch")) for row in rows}
    for batch in (1, 2):
        for expected in [
            ("train_step", "plain diffusers", "eager, full checkpointing"),
            ("train_step", "plain diffusers", "compiled blocks, full checkpointing"),
            ("train_step", "plain diffusers", "compiled blocks, no checkpointing"),
            ("train_step", "ours", "ours plain"),
            ("train_step", "ours", OURS_DEFAULT),
            ("train_step", "ours", TRAIN_FLOW),
        ]:
            assert (*expected, batch) in kinds, (expected, batch)
    generation = {row["path"]: row for row in rows if row["name"] == "generation"}
    assert {"baseline (eager)", "compiled blocks", "ours plain", OURS_EXACT} <= generation.keys()
    assert generation[OURS_EXACT]["full_steps"] == generation[OURS_EXACT]["steps"]  # exact: every step
    assert [row["branches"] for path, row in generation.items() if "joint" in path] == [2]
    assert [path for path in generation if "guidance interval" in path]
    checks = [row for row in rows if row["name"] == "check" and "step" in row]
    assert {(row["path"], row["batch"], row["step"]) for row in checks} >= {
        (OURS_DEFAULT, batch, step) for batch in (1, 2) for step in (1, 2)
    }
    assert all(row["gradient_relative_error"] < 1e-4 and row["max_param_grad_rel_error"] < 1e-3 for row in checks)
    assert all(len(row["worst"]) == 3 for row in checks)  # per-tensor, named
    assert {"data_per_sample", "per-clip", "batched"} <= {row["name"] for row in rows}
    assert "| train_step |" in run.stdout
    assert not (tmp_path / "docs").exists()  # CPU figures never reach docs/


def test_performance_results_take_the_measured_figures_and_keep_earlier_ones():
    ours, plain = {"name": "train_step", "model": "ours"}, {"name": "train_step", "model": "plain diffusers"}
    rows = [
        ours | {"path": OURS_DEFAULT, "batch": 2, "samples_per_s": 1.3, "peak_GiB": 33.0},
        ours | {"path": OURS_DEFAULT, "batch": 1, "samples_per_s": 1.1, "peak_GiB": 30.0},
        ours | {"path": TRAIN_FLOW, "batch": 2, "samples_per_s": 1.25},
        plain | {"path": "eager, full checkpointing", "batch": 2, "samples_per_s": 0.87},
        plain | {"path": "compiled blocks, full checkpointing", "batch": 2, "error": "out of memory"},
        {"name": "check", "path": OURS_DEFAULT, "batch": 1, "step": 2, "max_param_grad_rel_error": 0.004},
        {"name": "check", "path": OURS_DEFAULT, "batch": 2, "step": 1, "max_param_grad_rel_error": 0.002},
        {"name": "check", "path": "+ cudnn attention", "batch": 1, "step": 1, "max_param_grad_rel_error": 0.9},
    ]
    results = performance_results(rows, "2026-12-10", "NVIDIA H200")
    assert results["train"] == {
        "batch": 2,
        "ours_samples_per_s": 1.3,
        "ours_train_flow_samples_per_s": 1.25,
        "plain_eager_ckpt_samples_per_s": 0.87,
        "plain_compiled_ckpt_samples_per_s": None,  # failed: not measured
        "plain_compiled_nockpt_samples_per_s": None,
        "ours_peak_gib": 33.0,
        "max_param_grad_rel_error": 0.004,
    }
    assert results["generation"] == {"ours_exact_s": None, "plain_eager_s": None, "plain_compiled_s": None}
    assert (results["date"], results["gpu"]) == ("2026-12-10", "NVIDIA H200")
    later = performance_results(
        [{"name": "generation", "model": "ours", "path": OURS_EXACT, "total_s": 30.0}], "2026-12-11", "NVIDIA H200"
    )
    merged = merge_results(merge_results(None, results), later)
    assert merged["train"]["ours_samples_per_s"] == 1.3 and merged["generation"]["ours_exact_s"] == 30.0
    assert merged["generation"]["plain_compiled_s"] is None
    assert merged["measured"]["train.ours_samples_per_s"] == "2026-12-10"
    assert merged["measured"]["generation.ours_exact_s"] == merged["date"] == "2026-12-11"
    batch_one = performance_results(
        [{"name": "check", "path": OURS_DEFAULT, "batch": 1, "step": 2, "max_param_grad_rel_error": 0.003}],
        "2026-12-11",
        "NVIDIA H200",
    )
    assert merge_results(merged, batch_one)["train"]["max_param_grad_rel_error"] == 0.003  # another day: replaced
    same_day = merge_results(merge_results(merged, batch_one), later | {"train": {"max_param_grad_rel_error": 0.001}})
    assert same_day["train"]["max_param_grad_rel_error"] == 0.003  # the same day's runs: the largest
