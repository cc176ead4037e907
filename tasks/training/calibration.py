"""Step-cache calibration: what a step cache costs one trained model, and the setting it may use.

A step cache (diffusers' First Block Cache or MagCache, models/speed.py) skips the DiT's blocks
on the steps whose output it predicts from earlier ones. What that costs depends on the model (a
model that paints a bland fill hides what skipped steps would cost one that paints detail), so
no config turns one on: generation and evaluation compute every step, and a model gets a step
cache only by being calibrated here (the evaluate flow's `--calibrate`,
`evaluate.calibration.enabled`).

calibrate_step_cache, on the model being evaluated:

1. the first `evaluate.calibration.clips` clips of the evaluated split, generated exact (every
   step; after a short warm-up, so compilation stays out of the time), with the evaluation's
   steps, seed and guidance scales;
2. MagCache's magnitude ratios of this model, measured by diffusers' MagCache in calibration
   mode on the first clip (exact: nothing is skipped while it measures);
3. the same clips with each cache at each threshold (first_block_cache, mag_cache lists), after
   a warm-up each: mask-region PSNR against the real clips (the evaluation's primary metric) and
   its change from exact, mask-region PSNR against the exact output, the fraction of steps that
   ran every block, seconds per clip and the speed-up over exact;
4. per cache, the largest threshold below which every threshold kept the mask PSNR within
   `max_psnr_change_db` (0.3 dB) of exact; of those, the one with the best speed-up if it is at
   least `min_speedup`. None qualifying is a result too: the model stays exact.

The record (a dict, `calibration/step_cache.json` of the evaluation run) holds every row and the
choice; `registry_tags` turns it into the registry version's tags: `step_cache` (the chosen
setting as JSON, or {"method": null, "reason": ...}) and the readable `step_cache.method`,
`step_cache.threshold`, `step_cache.speedup`. `calibrated_step_cache(uri)` reads it back for
`python -m flows.generate --fast`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from models import metrics as m
from models import speed
from models.pipeline import ProductVideoPipeline
from storage import tracking
from tasks.training.evaluate import ClipInputs, EvaluationError, generate_clip, load_clip, split_rows
from tasks.training.model_store import is_base_model
from tasks.training.run_config import RunConfig

STEP_CACHE_TAG = "step_cache"  # the registry version's record: JSON
READABLE_TAGS = ("method", "threshold", "speedup")  # step_cache.<name>, for people reading the registry
RECORD_ARTIFACT = "calibration/step_cache.json"
WARM_UP_STEPS = 2


class CalibrationMissing(LookupError):
    """A model has no usable step-cache calibration; the message is one sentence saying what to do."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mask_psnr_of_mean_error(generated: list[np.ndarray], references: list[np.ndarray], masks: list[np.ndarray]):
    """PSNR (dB) of the mean squared error inside the masks over all clips; None when identical
    (a per-clip PSNR of identical outputs is infinite)."""
    mse = float(np.mean([((g - r) ** 2)[mask.astype(bool)].mean() for g, r, mask in zip(generated, references, masks)]))
    return None if mse == 0 else round(10 * math.log10(1.0 / mse), 3)


def _mean_mask_psnr(outputs: list[np.ndarray], clips: list[ClipInputs]) -> float:
    return float(np.mean([m.psnr(g, clip.video, clip.masks) for g, clip in zip(outputs, clips)]))


def choose(rows: list[dict], max_change_db: float, min_speedup: float) -> dict | None:
    """Per cache the largest threshold below which every threshold stayed within the budget,
    then the fastest of those with at least `min_speedup`; None when none qualifies."""
    best = None
    for method in speed.STEP_CACHE_METHODS:
        kept = None
        for row in sorted((r for r in rows if r["method"] == method), key=lambda r: r["threshold"]):
            if abs(row["psnr_mask_change_db"]) > max_change_db:
                break
            kept = row
        if kept is not None and kept["speedup"] >= min_speedup and (best is None or kept["speedup"] > best["speedup"]):
            best = kept
    return best


def calibrate_step_cache(
    pipe,
    run_config: RunConfig,
    dataset_root: str,
    split: str,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every configured step cache on this model and choose one (the module doc); the
    pipeline is left exact. Returns the record."""
    settings, sampler = run_config.evaluate, run_config.model.sampler
    calibration = settings.calibration
    steps = settings.num_inference_steps
    record = {
        "split": split,
        "steps": steps,
        "max_psnr_change_db": calibration.max_psnr_change_db,
        "min_speedup": calibration.min_speedup,
        "torch": torch.__version__,
        "rows": [],
        "chosen": None,
    }
    if not isinstance(pipe, ProductVideoPipeline):
        return record | {"reason": f"the {run_config.model.backend} backend takes no step cache: it stays exact"}
    if sampler.guidance_interval is not None:
        return record | {
            "reason": "model.sampler.guidance_interval changes the batch between steps, which a step cache "
            "cannot follow: it stays exact"
        }
    device = pipe._execution_device
    record["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    clips = []
    for row in split_rows(dataset_root, split):
        if len(clips) == calibration.clips:
            break
        try:
            clips.append(load_clip(dataset_root, row, run_config.data))
        except EvaluationError as error:
            log(f"calibration: clip {row['clip_key']} skipped: {error}")
    if not clips:
        raise EvaluationError(f"no clip of split {split!r} could be loaded for the step-cache calibration")
    record["clips"] = len(clips)
    warm_up = settings.model_copy(update={"num_inference_steps": min(WARM_UP_STEPS, steps)})

    def generate_all(cache: speed.StepCache | None) -> tuple[list[np.ndarray], float, float]:
        speed.enable_step_cache(pipe.transformer, cache, steps)
        try:
            generate_clip(pipe, clips[0], warm_up, sampler)  # compilation (and a cache's skip path) out of the time
            probes = [speed.StepCacheProbe(pipe.transformer) if cache else None for _ in clips]
            _sync(device)
            started = time.perf_counter()
            outputs = [generate_clip(pipe, clip, settings, sampler, probe) for clip, probe in zip(clips, probes)]
            _sync(device)
            seconds = (time.perf_counter() - started) / len(clips)
        finally:
            speed.disable_step_cache(pipe.transformer)
        full = float(np.mean([probe.full_step_fraction for probe in probes])) if cache else 1.0
        return outputs, seconds, full

    exact, exact_seconds, _ = generate_all(None)
    exact_psnr = _mean_mask_psnr(exact, clips)
    record |= {"exact_psnr_mask": round(exact_psnr, 4), "exact_seconds_per_clip": round(exact_seconds, 4)}
    log(f"calibration: exact, mask PSNR {exact_psnr:.3f} dB, {exact_seconds:.3f} s per clip ({len(clips)} clips)")

    mag_ratios = None
    if calibration.mag_cache:
        mag_ratios = speed.measure_mag_ratios(
            pipe.transformer, lambda probe: generate_clip(pipe, clips[0], settings, sampler, probe), steps
        )
        record["mag_ratios"] = [round(r, 6) for r in mag_ratios]
    plan = [(speed.FIRST_BLOCK_CACHE, t) for t in calibration.first_block_cache]
    plan += [(speed.MAG_CACHE, t) for t in calibration.mag_cache]
    for method, threshold in plan:
        cache = speed.StepCache(method, threshold, steps, tuple(mag_ratios) if method == speed.MAG_CACHE else None)
        outputs, seconds, full = generate_all(cache)
        psnr = _mean_mask_psnr(outputs, clips)
        row = {
            "method": method,
            "threshold": threshold,
            "psnr_mask": round(psnr, 4),
            "psnr_mask_change_db": round(psnr - exact_psnr, 4),
            "psnr_mask_vs_exact_db": mask_psnr_of_mean_error(outputs, exact, [c.masks for c in clips]),
            "full_step_fraction": round(full, 4),
            "seconds_per_clip": round(seconds, 4),
            "speedup": round(exact_seconds / seconds, 3),
        }
        record["rows"].append(row)
        log(
            f"calibration: {method} {threshold:g}: mask PSNR {row['psnr_mask_change_db']:+.3f} dB from exact, "
            f"{full:.0%} of steps in full, {row['speedup']:.2f}x"
        )

    chosen = choose(record["rows"], calibration.max_psnr_change_db, calibration.min_speedup)
    if chosen is None:
        record["reason"] = (
            f"no step cache kept the mask PSNR within {calibration.max_psnr_change_db:g} dB of exact with a "
            f"speed-up of at least {calibration.min_speedup:g}x on {len(clips)} clips: the model stays exact"
        )
    else:
        ratios = tuple(mag_ratios) if chosen["method"] == speed.MAG_CACHE else None
        cache = speed.StepCache(chosen["method"], chosen["threshold"], steps, ratios)
        measured = ("speedup", "psnr_mask_change_db", "psnr_mask_vs_exact_db", "full_step_fraction")
        record["chosen"] = cache.to_dict() | {key: chosen[key] for key in measured}
        record["reason"] = (
            f"{cache.describe()}: mask PSNR {chosen['psnr_mask_change_db']:+.3f} dB from exact (budget "
            f"{calibration.max_psnr_change_db:g} dB), {chosen['speedup']:.2f}x faster on {len(clips)} clips"
        )
    log(f"calibration: {record['reason']}")
    return record


# The pipeline is an argument: not cached, not persisted (as evaluate_split_task).
calibrate_step_cache_task = task(
    calibrate_step_cache, name="calibrate-step-cache", cache_policy=NO_CACHE, persist_result=False
)


def registry_tags(record: dict, evaluation_run_id: str) -> dict[str, str]:
    """The registry version's tags of a calibration record (the module doc)."""
    chosen = record.get("chosen")
    value = (chosen or {"method": None, "reason": record["reason"]}) | {"evaluation_run_id": evaluation_run_id}
    tags = {STEP_CACHE_TAG: json.dumps(value, sort_keys=True)}
    for name in READABLE_TAGS:
        tags[f"{STEP_CACHE_TAG}.{name}"] = "none" if chosen is None else str(chosen[name])
    return tags


def registry_version(uri: str, client: MlflowClient | None = None) -> tuple[str, str] | None:
    """(registered model name, version) that a models:/ URI names, or the version registered
    from a runs:/ URI (the newest with a usable calibration first); None for anything else (a
    folder, a base: model) and for a run never registered."""
    client = client or MlflowClient()
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].rstrip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            number = tracking.alias_version(client, name, alias)
            if number is None:
                raise tracking.ModelNotFoundError(f"no version of {name} has alias {alias} yet")
            return name, number
        name, number = rest.rsplit("/", 1)
        return name, number
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        path = path.strip("/") or "model"
        versions = [
            v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.source.rstrip("/").endswith("/" + path)
        ]
        versions.sort(key=lambda v: (_usable(v.tags), STEP_CACHE_TAG in v.tags, v.creation_timestamp), reverse=True)
        return (versions[0].name, str(versions[0].version)) if versions else None
    return None


def _usable(tags: dict) -> bool:
    """Whether a version's tags hold a calibration that chose a step cache."""
    try:
        return json.loads(tags.get(STEP_CACHE_TAG, "{}")).get("method") is not None
    except ValueError:
        return False


def calibrated_step_cache(uri: str) -> tuple[speed.StepCache, dict]:
    """The step cache calibrated for the model `uri` names and its record on the registry
    version; CalibrationMissing (one sentence) when there is none to use."""
    if is_base_model(uri):
        raise CalibrationMissing(
            f"{uri} is an untrained base model with no step-cache calibration: drop --fast to generate exact"
        )
    where = registry_version(uri)
    if where is None:
        raise CalibrationMissing(
            f"{uri} is not a registry version, so it carries no step-cache calibration: evaluate it with "
            "`python -m flows.evaluate --model <uri> --calibrate` and pass its models:/ URI, or drop --fast"
        )
    name, version = where
    tags = MlflowClient().get_model_version(name, version).tags
    if STEP_CACHE_TAG not in tags:
        raise CalibrationMissing(
            f"{uri} (version {version} of {name}) has no step-cache calibration: run "
            f"`python -m flows.evaluate --model models:/{name}/{version} --calibrate` first, or drop --fast"
        )
    record = json.loads(tags[STEP_CACHE_TAG])
    if record.get("method") is None:
        raise CalibrationMissing(
            f"{uri} (version {version} of {name}) was calibrated and no step cache passed ({record.get('reason')}); "
            "drop --fast"
        )
    return speed.StepCache.from_dict(record), record
