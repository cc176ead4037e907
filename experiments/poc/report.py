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

WINDOWS = ((0, 100), (100, 300), (300, 600), (600, 1000), (1000, 1500), (1500, 2500), (2500, 4000))  # the
# table's columns, as far as the longest run goes
SMOOTHING = 50  # steps in the plot's running mean


METRICS = ("loss", "loss_inside_mask", "loss_outside_mask")  # the objective, and its squared error in / out of the mask


def training_runs(client: MlflowClient) -> dict[str, tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """{run name: (run id, {metric: (steps, values)})} of the PoC's training runs (named by
    train.run_name), the latest run of each name (an earlier attempt may have crashed), for the
    METRICS the run logged."""
    names = {
        override.split("=", 1)[1]
        for overrides in RUNS.values()
        for override in overrides["train"]
        if override.startswith("train.run_name=")
    }
    found = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"]):
            if run.info.run_name in names and run.info.run_name not in found:
                curves = {}
                for metric in METRICS:
                    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
                    if history:
                        curves[metric] = tuple(np.array(column) for column in zip(*history))
                found[run.info.run_name] = (run.info.run_id, curves)
    return found


def write_report(mlflow_db: Path, out: Path) -> str:
    """loss_curves.json, loss.png (one panel per metric) and a table of window means per run and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uri = f"sqlite:///{mlflow_db.resolve()}"
    runs = training_runs(MlflowClient(uri, uri))
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_curves.json").write_text(
        json.dumps(
            {
                name: {
                    "run_id": run_id,
                    **{
                        metric: {"steps": steps.astype(int).tolist(), "values": values.tolist()}
                        for metric, (steps, values) in curves.items()
                    },
                }
                for name, (run_id, curves) in runs.items()
            }
        )
    )

    last = max(int(steps.max()) for _, curves in runs.values() for steps, _ in curves.values())
    windows = [(a, min(b, last)) for a, b in WINDOWS if a < last]
    header = "| run | metric | " + " | ".join(f"{a + 1}-{b}" for a, b in windows) + " |"
    lines = [header, "|---" * (len(windows) + 2) + "|"]
    for name, (_, curves) in runs.items():
        for metric, (steps, values) in curves.items():
            means = [values[(steps > a) & (steps <= b)].mean() for a, b in windows]
            lines.append(f"| {name} | {metric} | " + " | ".join(f"{value:.3f}" for value in means) + " |")

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.5))
    for ax, metric in zip(axes, METRICS):
        for name, (run_id, curves) in runs.items():
            if metric in curves:
                steps, values = curves[metric]
                window = min(SMOOTHING, len(values))
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1 :], smooth, label=f"{name} ({run_id[:8]})")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{metric} (mean of {SMOOTHING} steps)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    return "\n".join(lines)
