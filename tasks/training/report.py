"""The PoC report: the seed's success criteria (section 8.1), its decision matrix (8.2), figures.

Criteria (thresholds configurable in `ReportThresholds`, defaults from the seed):
- loss converges and decreases stably, judged on the training loss history (`loss_convergence`):
  every value finite; the mean of the last 20% of steps at least 10% below the mean of the first
  20%; and not rising at the end (the mean of the last 10% at most 5% above the mean of the 10%
  before it). Window means, not single steps, because a diffusion loss is noisy step to step.
- train PSNR > 25 dB, on the mask region by default: outside the mask a composited output copies
  the input, so whole-frame PSNR would mostly measure the background.
- train CLIP-I > 0.8.
- test generalisation: the human score (mean rating 1-5 on test-split products) >= 3.
- temporal consistency: no obvious flicker = the generated clips' warping error is at most 1.2x
  the real clips' warping error under the same flow (models/metrics.py).

A criterion whose metric is unavailable, or computed with untrained test weights, is "not
checked"; it is never counted as met. The decision matrix then applies, in this order of
precedence: loss not converged -> no convergence; train criteria failed with a converged loss ->
capacity; train criteria met but generalisation failed -> overfitting; flicker -> temporal problem.
All rows that apply are listed; the first is the verdict. All five criteria met -> success; nothing
failed but something unchecked -> inconclusive, naming what is missing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from models import metrics as m

MET, NOT_MET, NOT_CHECKED = "met", "not met", "not checked"
HUMAN_SCORE = "human_score"

# Decision matrix rows of seed 8.2, in order of precedence: (key, result, judgement, next step).
DECISION_MATRIX = (
    (
        "no_convergence",
        "Loss does not converge",
        "❌ failure",
        "check the data, adjust the learning rate, check the code",
    ),
    (
        "capacity",
        "Training poor, loss converged",
        "⚠️ capacity too small",
        "more adapter parameters, unfreeze more layers",
    ),
    (
        "overfitting",
        "Training good, generalisation poor",
        "⚠️ overfitting",
        "more data, data augmentation, regularisation",
    ),
    ("flicker", "Severe flicker", "⚠️ temporal problem", "add a temporal loss, adjust the architecture"),
    ("success", "All criteria met", "✅ success", "scale up the data and train the full model"),
)
INCONCLUSIVE_NEXT_STEP = "supply the missing measurements (see 'not checked') and rerun the report"


class ReportThresholds(BaseModel):
    """Success criteria of seed 8.1 and the section-6 targets shown for reference."""

    model_config = ConfigDict(extra="forbid")

    train_psnr_metric: str = m.PSNR_MASK
    train_psnr_min: float = 25.0
    train_clip_i_min: float = 0.8
    test_human_score_min: float = 3.0
    flicker_ratio_max: float = Field(1.2, gt=0)
    loss_curve: str = "train"  # which curve of the loss history is judged
    loss_window: float = Field(0.2, gt=0, le=0.5)  # first / last fraction of steps compared
    loss_min_drop: float = Field(0.1, ge=0, lt=1)  # tail mean <= (1 - drop) x head mean
    loss_max_end_rise: float = Field(0.05, ge=0)  # last half of the tail vs. its first half
    loss_min_points: int = Field(10, ge=4)
    # Section 6 targets: metric -> (">" or "<", bound); informative, not part of the verdict.
    targets: dict[str, tuple[Literal[">", "<"], float]] = {
        m.PSNR: (">", 25.0),
        m.PSNR_MASK: (">", 25.0),
        m.SSIM: (">", 0.85),
        m.SSIM_MASK: (">", 0.85),
        m.LPIPS: ("<", 0.15),
        m.LPIPS_MASK: ("<", 0.15),
        m.CLIP_I: (">", 0.8),
        m.DINO: (">", 0.7),
    }


def _criterion(name: str, target: str, status: str, evidence: str) -> dict:
    return {"criterion": name, "target": target, "status": status, "evidence": evidence}


def _usable(metric) -> tuple[float | None, str]:
    """(number, "") when the metric can be judged, else (None, why not)."""
    if metric is None:
        return None, "not measured"
    if isinstance(metric, Mapping):
        if "value" not in metric:
            return None, f"unavailable: {metric.get('unavailable', 'no value')}"
        if m.UNTRAINED_NOTE in metric.get("note", ""):
            return None, f"{metric['value']:.4g} was {m.UNTRAINED_NOTE}"
    value = m.value_of(metric)
    if value is None or np.isnan(value):
        return None, "no value"
    return value, ""


def _format(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _curve(values: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """A loss curve as (steps, losses): from per-step losses, or from (step, loss) pairs."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 2:
        return array[:, 0], array[:, 1]
    return np.arange(len(array), dtype=np.float64), array


def loss_convergence(history: Sequence, thresholds: ReportThresholds) -> dict:
    """The loss criterion from one curve (see the module doc for the rule)."""
    target = (
        f"last {thresholds.loss_window:.0%} mean >= {thresholds.loss_min_drop:.0%} below the "
        f"first {thresholds.loss_window:.0%}, not rising at the end"
    )
    name = "training loss converges and decreases stably"
    _, losses = _curve(history)
    if len(losses) < thresholds.loss_min_points:
        return _criterion(name, target, NOT_CHECKED, f"{len(losses)} loss values, need {thresholds.loss_min_points}")
    if not np.isfinite(losses).all():
        first_bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        return _criterion(name, target, NOT_MET, f"loss is {losses[first_bad]} at step index {first_bad}")
    window = max(2, int(round(len(losses) * thresholds.loss_window)))
    head, tail = losses[:window].mean(), losses[-window:].mean()
    half = window // 2
    tail_start, tail_end = losses[-window:-half].mean(), losses[-half:].mean()
    decreased = tail <= (1 - thresholds.loss_min_drop) * head
    settled = tail_end <= (1 + thresholds.loss_max_end_rise) * tail_start
    evidence = (
        f"first {window} steps mean {head:.4g} -> last {window} mean {tail:.4g} "
        f"({(tail - head) / head:+.1%}); end of the tail {tail_start:.4g} -> {tail_end:.4g}"
    )
    return _criterion(name, target, MET if decreased and settled else NOT_MET, evidence)


def _threshold(name: str, metric, bound: float, inclusive: bool = False) -> dict:
    """value > bound (>= when inclusive) -> met."""
    target = f"{'>=' if inclusive else '>'} {bound:g}"
    value, why_not = _usable(metric)
    if value is None:
        return _criterion(name, target, NOT_CHECKED, why_not)
    met = value >= bound if inclusive else value > bound
    return _criterion(name, target, MET if met else NOT_MET, f"{value:.4g}")


def flicker_check(metrics: Mapping, thresholds: ReportThresholds) -> dict:
    """Generated vs. real warping error (same flow): flicker when the ratio exceeds the maximum."""
    name = "temporal consistency: no obvious flicker"
    target = f"generated warping error <= {thresholds.flicker_ratio_max:g} x real"
    generated, why_generated = _usable(metrics.get(m.WARP_ERROR))
    real, why_real = _usable(metrics.get(m.WARP_ERROR_REAL))
    if generated is None or real is None:
        return _criterion(name, target, NOT_CHECKED, f"generated: {why_generated or 'ok'}; real: {why_real or 'ok'}")
    if real <= 0:
        return _criterion(name, target, NOT_CHECKED, "real warping error is 0 (static clips)")
    ratio = generated / real
    status = MET if ratio <= thresholds.flicker_ratio_max else NOT_MET
    return _criterion(name, target, status, f"{generated:.4g} / {real:.4g} = {ratio:.2f}x")


def decide(criteria: Mapping[str, dict]) -> dict:
    """Apply the decision matrix to the five criteria (keys: loss, train_psnr, train_clip_i,
    generalisation, temporal)."""
    status = {key: criterion["status"] for key, criterion in criteria.items()}
    train = [status["train_psnr"], status["train_clip_i"]]
    train_poor, train_good = NOT_MET in train, all(s == MET for s in train)
    applies = {
        "no_convergence": status["loss"] == NOT_MET,
        "capacity": train_poor and status["loss"] == MET,
        "overfitting": train_good and status["generalisation"] == NOT_MET,
        "flicker": status["temporal"] == NOT_MET,
        "success": all(s == MET for s in status.values()),
    }
    findings = [key for key, *_ in DECISION_MATRIX if applies[key]]
    outcome = findings[0] if findings else "inconclusive"
    next_step = {key: step for key, _, _, step in DECISION_MATRIX}.get(outcome, INCONCLUSIVE_NEXT_STEP)
    return {
        "outcome": outcome,
        "findings": findings,
        "next_step": next_step,
        "not_met": [k for k, s in status.items() if s == NOT_MET],
        "not_checked": [k for k, s in status.items() if s == NOT_CHECKED],
        "criteria": dict(criteria),
    }


def _plot_losses(curves: Mapping[str, Sequence], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        steps, values = _curve(values)
        (line,) = axis.plot(steps, values, alpha=0.3, linewidth=0.8)
        width = max(1, len(values) // 50)  # the moving average shows the trend through the noise
        if width > 1:
            smooth = np.convolve(values, np.ones(width) / width, mode="valid")
            axis.plot(
                steps[width - 1 :], smooth, color=line.get_color(), label=f"{label} (moving mean of {width} points)"
            )
        else:
            line.set_alpha(1.0)
            line.set_label(label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("Training loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_categories(per_category: Mapping[str, Mapping], names: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted(per_category)
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        values = [m.value_of(per_category[c].get(name)) for c in categories]
        axis.bar(categories, [np.nan if v is None else v for v in values], color="tab:blue")
        axis.set_title(name)
        axis.tick_params(axis="x", rotation=45)
    figure.suptitle("Test metrics per category")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


CATEGORY_PLOT_METRICS = (m.PSNR_MASK, m.SSIM_MASK, m.LPIPS_MASK, m.CLIP_I, m.DINO, m.WARP_ERROR)


def _metric_cell(metric) -> str:
    if metric is None:
        return "—"
    if isinstance(metric, Mapping) and "value" not in metric:
        return f"unavailable ({metric.get('unavailable', '')})"
    value = m.value_of(metric)
    note = metric.get("note") if isinstance(metric, Mapping) else None
    return f"{value:.4g}" + (f" ({note})" if note else "")


def poc_report(
    train_metrics: Mapping,
    test_metrics: Mapping,
    per_category: Mapping[str, Mapping],
    loss_history: Mapping[str, Sequence] | Sequence[float],
    thresholds: ReportThresholds | None = None,
    figure_dir: str | Path | None = None,
) -> tuple[str, dict, list[Path]]:
    """(markdown, verdict, figure paths) of the PoC report.

    train_metrics / test_metrics: a split's overall metrics ({name: MetricValue or float}, as
    `models.metrics.aggregate(...)["overall"]`); test_metrics may carry HUMAN_SCORE (mean 1-5
    rating). per_category: the test split's `aggregate(...)["by_category"]`. loss_history: per-step
    training losses, or {curve name: per-step losses or (step, loss) pairs} (the
    `thresholds.loss_curve` curve is judged, e.g. "train" next to a sparser "validation"). Figures
    are written to `figure_dir` (none when it is None) and linked by file name from the markdown.
    """
    thresholds = thresholds or ReportThresholds()
    curves = dict(loss_history) if isinstance(loss_history, Mapping) else {"train": list(loss_history)}
    judged = curves.get(thresholds.loss_curve, next(iter(curves.values()), []))
    criteria = {
        "loss": loss_convergence(judged, thresholds),
        "train_psnr": _threshold(
            f"train PSNR ({thresholds.train_psnr_metric})",
            train_metrics.get(thresholds.train_psnr_metric),
            thresholds.train_psnr_min,
        ),
        "train_clip_i": _threshold("train CLIP-I", train_metrics.get(m.CLIP_I), thresholds.train_clip_i_min),
        "generalisation": _threshold(
            "test generalisation: human score (1-5)",
            test_metrics.get(HUMAN_SCORE),
            thresholds.test_human_score_min,
            inclusive=True,
        ),
        "temporal": flicker_check(test_metrics, thresholds),
    }
    verdict = decide(criteria)

    figures: list[Path] = []
    if figure_dir is not None:
        figure_dir = Path(figure_dir)
        figure_dir.mkdir(parents=True, exist_ok=True)
        if any(len(values) for values in curves.values()):
            figures.append(_plot_losses(curves, figure_dir / "loss_curves.png"))
        plotted = [
            n for n in CATEGORY_PLOT_METRICS if any(m.value_of(row.get(n)) is not None for row in per_category.values())
        ]
        if per_category and plotted:
            figures.append(_plot_categories(per_category, plotted, figure_dir / "metrics_per_category.png"))
    return _markdown(verdict, train_metrics, test_metrics, per_category, thresholds, figures), verdict, figures


def _markdown(
    verdict: dict,
    train_metrics: Mapping,
    test_metrics: Mapping,
    per_category: Mapping[str, Mapping],
    thresholds: ReportThresholds,
    figures: list[Path],
) -> str:
    rows = {key: (result, judgement) for key, result, judgement, _ in DECISION_MATRIX}
    outcome = verdict["outcome"]
    headline = rows[outcome][1] if outcome in rows else "❔ inconclusive"
    lines = ["# PoC report", "", f"**Verdict: {headline}** — next step: {verdict['next_step']}.", ""]
    if len(verdict["findings"]) > 1:
        lines += ["Also applies: " + ", ".join(rows[k][1] for k in verdict["findings"][1:]) + ".", ""]
    if verdict["not_checked"]:
        names = ", ".join(verdict["criteria"][k]["criterion"] for k in verdict["not_checked"])
        lines += [f"Not checked (never assumed met): {names}.", ""]

    lines += ["## Success criteria (seed 8.1)", "", "| criterion | target | measured | status |", "|---|---|---|---|"]
    lines += [
        f"| {c['criterion']} | {c['target']} | {c['evidence']} | {c['status']} |" for c in verdict["criteria"].values()
    ]

    lines += [
        "",
        "## Decision matrix (seed 8.2)",
        "",
        "| result | judgement | next step | applies |",
        "|---|---|---|---|",
    ]
    for key, result, judgement, step in DECISION_MATRIX:
        lines.append(f"| {result} | {judgement} | {step} | {'**yes**' if key in verdict['findings'] else 'no'} |")

    if figures:
        lines += ["", "## Figures", ""] + [f"![{path.stem.replace('_', ' ')}]({path.name})" for path in figures]

    names = [*thresholds.targets, m.FVD, m.WARP_ERROR, m.WARP_ERROR_REAL, HUMAN_SCORE]
    lines += [
        "",
        "## Metrics (targets of seed section 6, informative)",
        "",
        "| metric | train | test | target | test vs target |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        if name not in train_metrics and name not in test_metrics:
            continue
        target, status = "", ""
        if name in thresholds.targets:
            sign, bound = thresholds.targets[name]
            target = f"{sign} {bound:g}"
            value, _ = _usable(test_metrics.get(name))
            status = (
                NOT_CHECKED if value is None else MET if (value > bound if sign == ">" else value < bound) else NOT_MET
            )
        elif name == m.FVD:
            target = "< 300 is an I3D-FVD target; this is a VideoMAE variant"
            status = "not comparable"
        lines.append(
            f"| {name} | {_metric_cell(train_metrics.get(name))} | "
            f"{_metric_cell(test_metrics.get(name))} | {target} | {status} |"
        )

    if per_category:
        shown = [n for n in (*CATEGORY_PLOT_METRICS, m.FVD) if any(n in row for row in per_category.values())]
        lines += [
            "",
            "## Test metrics per category",
            "",
            "| category | " + " | ".join(shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for category, row in sorted(per_category.items()):
            lines.append(f"| {category} | " + " | ".join(_metric_cell(row.get(n)) for n in shown) + " |")

    lines += [
        "",
        "Definitions: PSNR/SSIM/LPIPS `_mask` compare the same mask pixels of generated and "
        "real clips; warping error is the mean absolute error after warping frame t+1 to t with "
        "the real clip's optical flow, over non-occluded product pixels; FVD uses VideoMAE "
        "features. Values computed with untrained test weights never count as results.",
        "",
    ]
    return "\n".join(lines)


def log_report(
    run_id: str, markdown: str, verdict: dict, figures: Sequence[Path], artifact_dir: str = "report"
) -> None:
    """Log the report, its verdict and figures to an MLflow run (tag `poc.verdict`)."""
    client = MlflowClient()
    client.log_text(run_id, markdown, f"{artifact_dir}/poc_report.md")
    client.log_dict(run_id, verdict, f"{artifact_dir}/verdict.json")
    for path in figures:
        client.log_artifact(run_id, str(path), artifact_dir)
    client.set_tag(run_id, "poc.verdict", verdict["outcome"])


@task(name="poc-report", version="1")
def publish_poc_report(
    train_metrics: Mapping,
    test_metrics: Mapping,
    per_category: Mapping[str, Mapping],
    loss_history,
    run_id: str,
    thresholds: ReportThresholds | None = None,
) -> dict:
    """Build the report, log it to the MLflow run and show it as a Prefect markdown artifact.

    A plain Prefect task, not a `stage_task`: it has no dataset root and no manifest rows.
    """
    with tempfile.TemporaryDirectory() as folder:
        markdown, verdict, figures = poc_report(
            train_metrics, test_metrics, per_category, loss_history, thresholds, folder
        )
        log_report(run_id, markdown, verdict, figures)
    where = f"\n_Figures: MLflow run `{run_id}`, artifacts under `report/`._\n"
    create_markdown_artifact(markdown + where, key="poc-report", description="PoC report")
    return verdict
