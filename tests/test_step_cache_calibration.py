"""Exact by default, step caches only as calibrated per model (issue 16): no config skips a step,
the evaluate flow's calibration records a setting (or that none qualified) on the registry
version, and `generate --fast` uses exactly that record, or stops with one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from models import speed
from models.config import SamplerConfig
from models.spec import specification
from storage import tracking
from tasks.training.calibration import (
    STEP_CACHE_TAG,
    CalibrationMissing,
    calibrated_step_cache,
    choose,
    registry_tags,
)
from tasks.training.model_store import RUN_CONFIG_NAME, load_pipeline
from tasks.training.run_config import load_run_config
from tests.fixtures_models import write_config
from tests.test_generate import _inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAME = "calibration-test-model"
CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_no_shipped_config_skips_steps(config):
    sampler = load_run_config(config).model.sampler
    assert "step_cache_threshold" not in sampler.model_dump()
    assert sampler.guidance_interval is None and sampler.joint_guidance_scale is None  # today's guidance


def test_a_step_cache_threshold_in_a_config_is_refused_in_one_sentence():
    assert SamplerConfig(step_cache_threshold=None) == SamplerConfig()  # null said "exact": still read
    with pytest.raises(ValueError, match=r"step_cache_threshold is gone.*--calibrate.*--fast"):
        SamplerConfig(step_cache_threshold=0.2)


def test_a_model_saved_with_the_old_default_generates_exact(logged_model, tmp_path):
    """Model folders written when every model had First Block Cache 0.2 load without it."""
    folder = Path(mlflow.artifacts.download_artifacts(logged_model, dst_path=str(tmp_path / "model")))
    config = yaml.safe_load((folder / RUN_CONFIG_NAME).read_text())
    config["model"]["sampler"]["step_cache_threshold"] = 0.2
    (folder / RUN_CONFIG_NAME).write_text(yaml.safe_dump(config))
    pipe, run_config = load_pipeline(folder)
    assert not pipe.transformer.wan.is_cache_enabled
    assert "step_cache_threshold" not in run_config.model.sampler.model_dump()


def test_step_cache_settings_round_trip_and_refuse_nonsense():
    cache = speed.StepCache(speed.MAG_CACHE, 0.06, 4, (1.0, 1.1, 0.9, 0.95))
    assert speed.StepCache.from_dict(json.loads(json.dumps(cache.to_dict()))) == cache
    assert cache.diffusers_config(8).num_inference_steps == 8
    with pytest.raises(ValueError, match="magnitude ratios"):
        speed.StepCache(speed.MAG_CACHE, 0.06, 4)
    with pytest.raises(ValueError, match="step cache 'tea_cache'"):
        speed.StepCache("tea_cache", 0.1, 4)


def row(method, threshold, change, speedup):
    return {"method": method, "threshold": threshold, "psnr_mask_change_db": change, "speedup": speedup}


def test_choice_is_the_largest_threshold_under_the_budget_then_the_fastest_cache():
    rows = [
        row(speed.FIRST_BLOCK_CACHE, 0.05, 0.0, 1.1),
        row(speed.FIRST_BLOCK_CACHE, 0.1, -0.2, 1.5),
        row(speed.FIRST_BLOCK_CACHE, 0.2, 0.5, 3.0),  # over the budget: it and every larger one out
        row(speed.FIRST_BLOCK_CACHE, 0.3, 0.1, 4.0),
        row(speed.MAG_CACHE, 0.02, 0.1, 1.3),
    ]
    assert choose(rows, 0.3, 1.05) == rows[1]  # 1.5x beats MagCache's 1.3x
    assert choose(rows, 0.3, 1.4) == rows[1]
    assert choose(rows, 0.3, 1.6) is None  # too little speed-up: the model stays exact
    assert choose([row(speed.MAG_CACHE, 0.02, 0.4, 2.0)], 0.3, 1.0) is None


def _tiny_pipeline(tiny_cfg):
    torch.manual_seed(0)
    spec = specification(tiny_cfg)
    pipe = spec.pipeline(spec.build_generator())
    for block in pipe.transformer.wan.blocks:
        block.attn1.processor.gate.data.fill_(0.1)
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 5, 32, 48)
    mask[..., 8:24, 12:36] = 1
    photos = [[(torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()]]

    def generate(callback=None, steps=6, **options):
        return pipe(
            video * (1 - mask),
            mask,
            photos,
            "a red bottle",
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback=callback,
            **options,
        )

    return pipe, generate


def test_mag_cache_is_measured_and_skips_with_diffusers_hooks(tiny_cfg):
    """MagCache's ratios come from diffusers' own calibration mode; the probe counts the steps
    each cache ran in full from the caches' own decisions."""
    pipe, generate = _tiny_pipeline(tiny_cfg)
    exact = generate()
    ratios = speed.measure_mag_ratios(pipe.transformer, lambda probe: generate(probe), 6)
    assert len(ratios) == 6 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert not pipe.transformer.wan.is_cache_enabled
    # MagCache: step 0 in full (the first 20%), then at most 3 skipped in a row: full at 0 and 4.
    for cache, full in (
        (speed.StepCache(speed.MAG_CACHE, 1e9, 6, tuple(ratios)), 2),
        (speed.StepCache(speed.FIRST_BLOCK_CACHE, 1e9, 6), 1),
    ):
        speed.enable_step_cache(pipe.transformer, cache, 6)
        probe = speed.StepCacheProbe(pipe.transformer)
        cached = generate(probe)
        assert (probe.steps, probe.full_steps) == (6, full), cache
        assert not torch.allclose(cached, exact)
    speed.enable_step_cache(pipe.transformer, speed.StepCache(speed.FIRST_BLOCK_CACHE, 1e-9, 6), 6)
    probe = speed.StepCacheProbe(pipe.transformer)
    assert torch.allclose(generate(probe), exact, atol=1e-6) and probe.full_steps == 6
    speed.disable_step_cache(pipe.transformer)
    assert torch.equal(generate(), exact)


# -- the evaluate flow records, generate --fast uses ------------------------------------------


@pytest.fixture(scope="module")
def calibrated(logged_model, split_dataset, local_mlflow, tmp_path_factory) -> dict:
    """The tiny model evaluated with --calibrate: First Block Cache at a threshold that skips
    nothing and one that skips every step after the first (both allowed: the test sets the budget),
    no MagCache (its choice against First Block Cache would depend on timing)."""
    from flows.evaluate import evaluate

    config = write_config(
        tmp_path_factory.mktemp("calibration") / "tiny.yaml",
        split_dataset,
        local_mlflow,
        [
            f"registry.model_name={NAME}",
            "evaluate.max_clips=1",
            "evaluate.calibration.clips=1",
            "evaluate.calibration.first_block_cache=[1.0e-9,1.0e+9]",
            "evaluate.calibration.mag_cache=[]",
            "evaluate.calibration.max_psnr_change_db=1000",
            "evaluate.calibration.min_speedup=0",
        ],
    )
    return evaluate(model=logged_model, config=str(config), train_clips=0, calibrate=True) | {"config": config}


@pytest.mark.slow
def test_calibration_is_recorded_on_the_evaluation_run_and_the_registry_version(calibrated, logged_model):
    record = calibrated["calibration"]
    assert [(r["method"], r["threshold"]) for r in record["rows"]] == [
        (speed.FIRST_BLOCK_CACHE, 1e-9),
        (speed.FIRST_BLOCK_CACHE, 1e9),
    ]
    skipping_nothing, skipping = record["rows"]
    assert skipping_nothing["full_step_fraction"] == 1.0 and skipping_nothing["psnr_mask_vs_exact_db"] is None
    assert skipping["full_step_fraction"] == 0.5  # 2 evaluation steps, the first always in full
    assert record["chosen"]["method"] == speed.FIRST_BLOCK_CACHE and record["chosen"]["threshold"] == 1e9
    version = calibrated["registry"]["version"]
    tags = MlflowClient().get_model_version(NAME, version).tags
    stored = json.loads(tags[STEP_CACHE_TAG])
    assert stored["threshold"] == 1e9 and stored["steps"] == 2
    assert stored["evaluation_run_id"] == calibrated["evaluation_run_id"]
    assert tags["step_cache.method"] == speed.FIRST_BLOCK_CACHE and float(tags["step_cache.speedup"]) > 0
    run = MlflowClient().get_run(calibrated["evaluation_run_id"])
    assert run.data.tags["step_cache.threshold"] == "1000000000.0"
    assert "calibration/first_block_cache/1e09/speedup" in run.data.metrics
    artifact = mlflow.artifacts.load_dict(f"runs:/{calibrated['evaluation_run_id']}/calibration/step_cache.json")
    assert artifact["chosen"] == record["chosen"]
    assert calibrated_step_cache(logged_model)[0].threshold == 1e9  # a runs:/ URI finds its calibrated version


def _generate(tmp_path, name, model_args, extra=(), data_dir=None):
    from flows.generate import main as generate_cli

    folder = tmp_path / name
    folder.mkdir()
    video, masks, photos = _inputs(folder)
    output = folder / "out.mp4"
    generate_cli(
        ["--video", str(video), "--masks", str(masks), "--images", *photos, *model_args]
        + ["--steps", "2", "--output", str(output), "--device", "cpu", "--data-dir", str(data_dir), *extra]
    )
    return output


@pytest.mark.slow
def test_generate_fast_uses_the_recorded_step_cache(calibrated, local_mlflow, tmp_path, monkeypatch):
    from storage.video import read_video

    used = []
    enable = speed.enable_step_cache
    monkeypatch.setattr(speed, "enable_step_cache", lambda *args: used.append(args[1]) or enable(*args))
    model = ["--model", f"models:/{NAME}/{calibrated['registry']['version']}"]
    exact = _generate(tmp_path, "exact", model, data_dir=local_mlflow)
    assert used == []
    fast = _generate(tmp_path, "fast", model, ["--fast"], data_dir=local_mlflow)
    assert used == [speed.StepCache(speed.FIRST_BLOCK_CACHE, 1e9, 2)]
    assert not np.array_equal(read_video(fast), read_video(exact))  # the second step was skipped


@pytest.mark.slow
def test_generate_fast_without_a_calibration_stops_in_one_sentence(calibrated, local_mlflow, tmp_path, capsys):
    client = MlflowClient()
    source = tracking.model_source(f"models:/{NAME}/{calibrated['registry']['version']}")
    uncalibrated = tracking.register_model_version(source.run_id, "model", {}, name=f"{NAME}-uncalibrated")
    refused = tracking.register_model_version(source.run_id, "model", {}, name=f"{NAME}-refused")
    record = {"rows": [], "chosen": None, "reason": "no step cache kept the mask PSNR within 0.3 dB of exact"}
    for key, value in registry_tags(record, "run-x").items():
        client.set_model_version_tag(f"{NAME}-refused", refused, key, value)
    cases = [
        (f"models:/{NAME}-uncalibrated/{uncalibrated}", "has no step-cache calibration: run"),
        (f"models:/{NAME}-refused/{refused}", "was calibrated and no step cache passed"),
        ("base:configs/tiny.yaml", "untrained base model"),
    ]
    for uri, message in cases:
        with pytest.raises(SystemExit) as stopped:
            _generate(tmp_path, uri.replace(":", "-").replace("/", "-"), ["--model", uri], ["--fast"], local_mlflow)
        error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not tqdm's bar
        assert stopped.value.code == 2 and len(error) == 1 and message in error[0], error
    with pytest.raises(CalibrationMissing, match="is not a registry version"):
        calibrated_step_cache(str(tmp_path))
