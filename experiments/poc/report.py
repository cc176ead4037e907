"""The PoC's loss figures from the MLflow database its GPU run brought back: the curves as JSON,
a table of window means (printed, for docs/poc.md) and a plot.

    python -m experiments.poc report --mlflow-db out/mlflow.db --out docs/bench/poc-2026-12-01
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from experiments.poc import RUNS

WINDOWS = ((0, 100), (100, 200), (200, 500), (500, 1000), (1000, 2000), (2000, 2600), (2600, 3200))  # the table's
# columns, as far as the longest run goes
SMOOTHING = 50  # steps in the plot's running mean


def training_runs(client: MlflowClient) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """{run name: (run id, steps, loss)} of the PoC's training runs (named by train.run_name)."""
    names = {override.split("=", 1)[1] for overrides in RUNS.values() for override in overrides["train"]
             if override.startswith("train.run_name=")}
    found = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            if run.info.run_name in names:
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
                steps, loss = (np.array(column) for column in zip(*history))
                found[run.info.run_name] = (run.info.run_id, steps, loss)
    return found


def write_report(mlflow_db: Path, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uri = f"sqlite:///{mlflow_db.resolve()}"
    runs = training_runs(MlflowClient(uri, uri))
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_curves.json").write_text(json.dumps(
        {name: {"run_id": run_id, "steps": steps.astype(int).tolist(), "loss": loss.tolist()}
         for name, (run_id, steps, loss) in runs.items()}))

    last = max(int(steps.max()) for _, steps, _ in runs.values())
    windows = [(a, min(b, last)) for a, b in WINDOWS if a < last]
    header = "| run | " + " | ".join(f"{a + 1}-{b}" for a, b in windows) + " |"
    lines = [header, "|---" * (len(windows) + 1) + "|"]
    for name, (_, steps, loss) in runs.items():
        means = [loss[(steps > a) & (steps <= b)].mean() for a, b in windows]
        lines.append(f"| {name} | " + " | ".join(f"{value:.3f}" for value in means) + " |")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, (run_id, steps, loss) in runs.items():
        smooth = np.convolve(loss, np.ones(SMOOTHING) / SMOOTHING, mode="valid")
        ax.plot(steps[SMOOTHING - 1:], smooth, label=f"{name} ({run_id[:8]})")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"flow-matching loss (mean of {SMOOTHING} steps)")
    ax.set_title("PoC runs: A (photos) and B (no photos)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    return "\n".join(lines)
