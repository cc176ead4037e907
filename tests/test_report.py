"""The PoC report's verdict for every row of the seed's decision matrix, from constructed inputs."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pytest

from models import metrics as m
from tasks.training import report as r

CONVERGED = list(1.0 / (1 + 0.05 * np.arange(200)) + 0.02 * np.sin(np.arange(200)))
DIVERGING = list(np.linspace(1.0, 0.6, 100)) + list(np.linspace(0.6, 3.0, 100))


def _split(psnr=27.0, clip_i=0.85, warp=0.011, warp_real=0.010, **extra):
    return {
        m.PSNR_MASK: m.available(psnr),
        m.CLIP_I: m.available(clip_i),
        m.WARP_ERROR: m.available(warp),
        m.WARP_ERROR_REAL: m.available(warp_real),
        **extra,
    }


PER_CATEGORY = {
    "ring": {m.PSNR_MASK: {"value": 26.0, "n": 3}, m.CLIP_I: {"unavailable": "no weights"}},
    "watch": {m.PSNR_MASK: {"value": 28.0, "n": 2}, m.CLIP_I: {"unavailable": "no weights"}},
}


def _verdict(train, test, losses=CONVERGED, **kwargs):
    return r.poc_report(train, test, PER_CATEGORY, losses, **kwargs)[1]


def test_all_criteria_met_is_a_success_and_plots_are_written(tmp_path):
    markdown, verdict, figures = r.poc_report(
        _split(),
        _split(human_score=3.0),
        PER_CATEGORY,
        {"train": CONVERGED, "validation": [(s, CONVERGED[s]) for s in range(0, 200, 20)]},
        figure_dir=tmp_path,
    )
    assert verdict["outcome"] == "success" and verdict["findings"] == ["success"]
    assert not verdict["not_checked"] and "✅ success" in markdown
    assert [f.name for f in figures] == ["loss_curves.png", "metrics_per_category.png"]
    assert all(f.stat().st_size > 1000 for f in figures)
    assert "![loss curves](loss_curves.png)" in markdown
    assert "| ring | 26 |" in markdown


def test_good_training_poor_generalisation_is_overfitting():
    verdict = _verdict(_split(), _split(psnr=18.0, human_score=2.0))
    assert verdict["outcome"] == "overfitting"
    assert verdict["not_met"] == ["generalisation"]


def test_poor_training_with_converged_loss_is_capacity():
    verdict = _verdict(_split(psnr=21.0), _split(human_score=3.5))
    assert verdict["outcome"] == "capacity" and "unfreeze" in verdict["next_step"]


def test_loss_that_does_not_converge_is_a_failure_and_takes_precedence():
    verdict = _verdict(_split(psnr=21.0), _split(human_score=1.0), losses=DIVERGING)
    assert verdict["outcome"] == "no_convergence"
    flat = _verdict(_split(), _split(human_score=4.0), losses=[1.0 + 0.01 * (i % 3) for i in range(100)])
    assert flat["outcome"] == "no_convergence"
    nan = _verdict(_split(), _split(human_score=4.0), losses=CONVERGED[:50] + [float("nan")] + CONVERGED[50:])
    assert nan["outcome"] == "no_convergence" and "nan" in nan["criteria"]["loss"]["evidence"]


def test_flicker_is_judged_against_the_real_clips_warping_error():
    verdict = _verdict(_split(), _split(human_score=4.0, warp=0.013, warp_real=0.010))
    assert verdict["outcome"] == "flicker" and "1.30x" in verdict["criteria"]["temporal"]["evidence"]
    both = _verdict(_split(psnr=20.0), _split(human_score=4.0, warp=0.02, warp_real=0.01))
    assert both["findings"] == ["capacity", "flicker"]


def test_unavailable_or_untrained_metrics_never_count_as_met():
    train = _split(clip_i=0.95)
    train[m.CLIP_I] = m.unavailable("no clip network configured (MetricNetworks.clip)")
    markdown, verdict, _ = r.poc_report(train, _split(), PER_CATEGORY, CONVERGED)
    assert verdict["outcome"] == "inconclusive"
    assert set(verdict["not_checked"]) == {"train_clip_i", "generalisation"}
    assert "no clip network configured" in verdict["criteria"]["train_clip_i"]["evidence"]
    assert "Not checked (never assumed met)" in markdown and "✅" not in markdown.split("##")[0]

    train[m.CLIP_I] = m.available(0.99, note=m.UNTRAINED_NOTE)
    verdict = _verdict(train, _split(human_score=5.0))
    assert verdict["outcome"] == "inconclusive" and verdict["not_checked"] == ["train_clip_i"]
    # Overfitting needs *good* training: an unchecked train metric cannot make it.
    assert _verdict(train, _split(human_score=1.0))["outcome"] == "inconclusive"


def test_thresholds_are_configurable():
    strict = r.ReportThresholds(train_psnr_min=30.0)
    assert _verdict(_split(), _split(human_score=4.0), thresholds=strict)["outcome"] == "capacity"
    whole_frame = r.ReportThresholds(train_psnr_metric=m.PSNR)
    assert (
        "not measured"
        in _verdict(_split(), _split(human_score=4.0), thresholds=whole_frame)["criteria"]["train_psnr"]["evidence"]
    )


def test_report_is_logged_to_the_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    try:
        experiment = mlflow.create_experiment("report", artifact_location=(tmp_path / "artifacts").as_uri())
        run_id = mlflow.MlflowClient().create_run(experiment).info.run_id
        markdown, verdict, figures = r.poc_report(
            _split(), _split(human_score=4.0), PER_CATEGORY, CONVERGED, figure_dir=tmp_path / "figures"
        )
        r.log_report(run_id, markdown, verdict, figures)
        run = mlflow.get_run(run_id)
        assert run.data.tags["poc.verdict"] == "success"
        logged = tmp_path / "artifacts" / run_id / "artifacts" / "report"
        assert json.loads((logged / "verdict.json").read_text())["outcome"] == "success"
        assert {p.name for p in logged.iterdir()} == {
            "poc_report.md",
            "verdict.json",
            "loss_curves.png",
            "metrics_per_category.png",
        }
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("losses", [[], [1.0] * 5])
def test_too_short_loss_history_is_not_checked(losses):
    assert _verdict(_split(), _split(human_score=4.0), losses=losses)["not_checked"] == ["loss"]
