"""build-dataset: crawled product pages -> a training-ready dataset.

```
source tree ─ ingest ─┬─ scenes (per video) ─ segment (per clip) ─ masking (per clip) ─┐
                      └─ product images (per product) ─────────────────────────────────┴─ assemble
```

    python -m flows.build_dataset --source data/demo/source --output data/demo/dataset \
        --config configs/dataset/demo.yaml --set scenes.max_clip_s=8

Its options are one YAML (configs/dataset/*.yaml, tasks/dataset/build_config.py) with dotted
`--set` overrides, as train's; the resolved config is recorded in the dataset root as build.yaml
and is the config of the root's next build unless another is given.

Every per-item step is a cached, retryable Prefect task (tasks/dataset/stage.py): re-running with nothing
changed does no work, a new product is processed alone, a changed option re-runs that stage and
what follows. Bad items become rows of `manifests/rejects.parquet`; only systemic errors fail the run.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from storage.config_files import ConfigError
from storage.errors import SystemicError
from storage.layout import DatasetRoot
from storage.rejects import reject_row
from tasks.dataset.assemble import SPLITS, assemble
from tasks.dataset.build_config import BuildConfig, rebuild_plan, recorded_build_config, resolve_build_config
from tasks.dataset.ingest import ingest_task
from tasks.dataset.masking import masking_task
from tasks.dataset.product_images import product_images_task
from tasks.dataset.scenes import scenes_task
from tasks.dataset.segment import segment_task
from tasks.dataset.stage import StageResult, cache_storage

# The config of a root that records none and is given none (the code's defaults, spelled out).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dataset" / "default.yaml"

# Fields of each stage's rows that name files under the root: a cached result whose files are
# gone (someone deleted them) is recomputed instead of trusted.
OUTPUT_FIELDS = {
    "scenes": ("video_path",),
    "segment": ("mask_dir",),
    "masking": ("masked_video_path",),
    "product_images": ("image_path",),
}


class Progress:
    """A Prefect progress artifact, updated at most once a second."""

    def __init__(self):
        self.done, self.total, self._last = 0, 0, 0.0
        self._id = create_progress_artifact(
            0.0, key="build-dataset-progress", description="items processed / items known"
        )

    def add(self, n: int) -> None:
        self.total += n

    def step(self) -> None:
        self.done += 1
        if time.monotonic() - self._last > 1.0 or self.done == self.total:
            self._last = time.monotonic()
            update_progress_artifact(self._id, 100.0 * self.done / max(self.total, 1))


class Runner:
    """Submits stage tasks and turns their outcomes into StageResults, never into flow failures,
    except for SystemicError."""

    def __init__(self, root: DatasetRoot, progress: Progress, rerun: set[str] = frozenset()):
        """rerun: stages that run every item again instead of trusting the cache (a config change)."""
        self.root, self.progress = root, progress
        storage = cache_storage(root)
        tasks = {
            "scenes": scenes_task,
            "segment": segment_task,
            "masking": masking_task,
            "product_images": product_images_task,
        }
        self.tasks = {
            stage: task.with_options(result_storage=storage, refresh_cache=stage in rerun or None)
            for stage, task in tasks.items()
        }
        self.items: dict[PrefectFuture, tuple[str, dict, dict]] = {}
        self.work: dict[str, collections.Counter] = {stage: collections.Counter() for stage in self.tasks}

    def submit(self, stage: str, label: dict, **kwargs) -> PrefectFuture:
        future = self.tasks[stage].submit(root=str(self.root.root), **kwargs)
        self.items[future] = (stage, label, kwargs)
        self.progress.add(1)
        return future

    def outcome(self, future: PrefectFuture) -> StageResult:
        stage, label, kwargs = self.items.pop(future)
        try:
            result = future.result()
            cached = future.state.name == "Cached"
            if not self._outputs_exist(stage, result):
                result = (
                    self.tasks[stage]
                    .with_options(refresh_cache=True)
                    .submit(root=str(self.root.root), **kwargs)
                    .result()
                )
                cached = False
            self.work[stage]["cached" if cached else "ran"] += 1
        except SystemicError:
            raise
        except Exception as exc:  # an unexpected bug on one item: set it aside, keep the run going
            result = {
                "rows": [],
                "rejects": [
                    reject_row(
                        stage,
                        label["item"],
                        "internal_error",
                        f"{type(exc).__name__}: {exc}",
                        label.get("product_id"),
                        label.get("clip_id"),
                    )
                ],
            }
        self.progress.step()
        return result

    def _outputs_exist(self, stage: str, result: StageResult) -> bool:
        return all(self.root.path(row[f]).exists() for row in result["rows"] for f in OUTPUT_FIELDS[stage])


def _merge(results: dict[str, list[dict]], stage: str, result: StageResult) -> list[dict]:
    results[stage] += result["rows"]
    results["rejects"] += result["rejects"]
    return result["rows"]


@flow(name="build-dataset", task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count()), log_prints=True)
def build_dataset(
    source: str,
    output: str,
    config: str | BuildConfig | None = None,
    overrides: list[str] = [],  # noqa: B006 - a flow parameter (deployments show this default), never mutated
) -> dict:
    """Build (or update) the dataset at `output` from the product pages under `source`.

    config: a build YAML (configs/dataset/*.yaml) or a validated BuildConfig; None = the one
    `output` records (build.yaml), else configs/dataset/default.yaml. overrides: dotted
    key=value settings applied on top, e.g. segmentation.backend=classic."""
    logger = get_run_logger()
    root = DatasetRoot.create(output)
    cfg = resolve_build_config(root, config, overrides, default=DEFAULT_CONFIG)
    plan = rebuild_plan(recorded_build_config(root), cfg, root.has_manifest("dataset"))
    if plan["changes"]:
        logger.warning(
            "the config differs from the one %s was built with (%s); stages %s run every item again",
            root.root,
            "; ".join(plan["changes"]),
            sorted(plan["rerun"]),
        )
    root.write_build_config(cfg.model_dump(mode="json"))
    scenes, segmentation, masking, images, splits = cfg.scenes, cfg.segmentation, cfg.masking, cfg.images, cfg.splits

    ingested = ingest_task(source, images.min_images)
    products = {p["product_id"]: p for p in ingested["products"]}
    videos = [f for f in ingested["source_files"] if f["role"] == "video"]
    photos: dict[str, list[dict]] = collections.defaultdict(list)
    for f in ingested["source_files"]:
        if f["role"] == "image":
            photos[f["product_id"]].append(f)
    logger.info("ingest: %d products, %d videos, %d rejects", len(products), len(videos), len(ingested["rejects"]))

    results: dict[str, list[dict]] = collections.defaultdict(list)
    results["rejects"] += ingested["rejects"]
    run = Runner(root, Progress(), plan["rerun"])

    image_futures = [
        run.submit("product_images", {"item": pid, "product_id": pid}, product_id=pid, images=photos[pid], cfg=images)
        for pid in products
    ]
    scene_futures = [
        run.submit("scenes", {"item": v["uri"], "product_id": v["product_id"]}, video=v, cfg=scenes) for v in videos
    ]
    # Each stage's tasks start as soon as their input is ready, so stages overlap.
    segment_futures = {}
    for future in as_completed(scene_futures):
        for clip in _merge(results, "scenes", run.outcome(future)):
            label = {"item": clip["clip_key"], "product_id": clip["product_id"], "clip_id": clip["clip_id"]}
            segment_futures[
                run.submit("segment", label, clip=clip, prompt=products[clip["product_id"]]["prompt"], cfg=segmentation)
            ] = clip
    masking_futures = []
    for future in as_completed(list(segment_futures)):
        clip = segment_futures[future]
        for masks in _merge(results, "segment", run.outcome(future)):
            label = {"item": clip["clip_key"], "product_id": clip["product_id"], "clip_id": clip["clip_id"]}
            masking_futures.append(run.submit("masking", label, clip=clip, masks=masks, cfg=masking))
    for future in as_completed(masking_futures):
        _merge(results, "masking", run.outcome(future))
    for future in as_completed(image_futures):
        _merge(results, "product_images", run.outcome(future))

    previous = {}
    if root.has_manifest("dataset"):
        previous = dict(zip(*root.read_manifest("dataset").select(["product_id", "split"]).to_pydict().values()))
    rows, dataset_json, assemble_rejects = assemble(
        ingested["products"],
        results["scenes"],
        results["segment"],
        results["masking"],
        results["product_images"],
        previous,
        splits,
    )
    results["rejects"] += assemble_rejects

    manifests = {
        "products": ingested["products"],
        "source_files": ingested["source_files"],
        "clips": results["scenes"],
        "masks": results["segment"],
        "masked_videos": results["masking"],
        "product_images": results["product_images"],
        "rejects": results["rejects"],
        "dataset": rows,  # last: its presence marks a finished build
    }
    for name, manifest_rows in manifests.items():
        root.write_manifest(name, manifest_rows)
    root.write_json("dataset.json", dataset_json)

    summary = _summary(manifests, rows, run.work) | {"config": cfg.name, "config_changes": plan["changes"]}
    _publish_summary(summary, root)
    return summary


def _summary(manifests: dict[str, list[dict]], dataset_rows: list[dict], work: dict[str, collections.Counter]) -> dict:
    rejects = collections.Counter((r["stage"], r["reason_code"]) for r in manifests["rejects"])
    splits = collections.Counter(r["split"] for r in dataset_rows)
    split_products = {s: len({r["product_id"] for r in dataset_rows if r["split"] == s}) for s in SPLITS}
    return {
        "items": {name: len(rows) for name, rows in manifests.items() if name != "rejects"},
        "task_runs": {stage: {"ran": c["ran"], "cached": c["cached"]} for stage, c in work.items()},
        "rejects": {f"{stage}/{code}": n for (stage, code), n in sorted(rejects.items())},
        "clips_per_split": {s: splits.get(s, 0) for s in SPLITS},
        "products_per_split": split_products,
    }


def _publish_summary(summary: dict, root: DatasetRoot) -> None:
    table = [{"section": "items", "name": k, "count": v} for k, v in summary["items"].items()]
    table += [
        {"section": "task runs (ran / from cache)", "name": k, "count": f"{v['ran']} / {v['cached']}"}
        for k, v in summary["task_runs"].items()
    ]
    table += [{"section": "rejects", "name": k, "count": v} for k, v in summary["rejects"].items()]
    table += [{"section": "clips per split", "name": k, "count": v} for k, v in summary["clips_per_split"].items()]
    create_table_artifact(
        table,
        key="build-dataset-summary",
        description=f"Dataset at `{root.root}`: items per stage, rejects by reason, clips per split",
    )
    lines = [f"# Dataset built at `{root.root}`", "", "| split | clips | products |", "|---|---|---|"]
    lines += [f"| {s} | {summary['clips_per_split'][s]} | {summary['products_per_split'][s]} |" for s in SPLITS]
    lines += [
        "",
        "Manifests: `manifests/*.parquet`; what was set aside and why: `manifests/rejects.parquet`.",
        f"Config `{summary['config']}`, recorded in `build.yaml`.",
    ]
    if summary["config_changes"]:
        lines += ["", "Changed since the previous build of this root (those stages ran every item again):", ""]
        lines += [f"- `{change}`" for change in summary["config_changes"]]
    create_markdown_artifact("\n".join(lines), key="build-dataset-report")


def run_with_dask(workers: int) -> Callable[..., dict]:
    """The same flow on a local Dask cluster of `workers` processes (one thread each)."""
    from prefect_dask import DaskTaskRunner

    return build_dataset.with_options(
        task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Build a training dataset from crawled product pages.")
    parser.add_argument("--source", required=True, help="source tree: local path or fsspec URL")
    parser.add_argument("--output", required=True, help="dataset root to create or update")
    parser.add_argument(
        "--config",
        default=None,
        help="build config YAML (configs/dataset/*.yaml); default: the one the output records "
        "(OUT/build.yaml), else configs/dataset/default.yaml",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the config, e.g. segmentation.backend=classic (repeatable)",
    )
    parser.add_argument("--dask-workers", type=int, default=0, help="run per-item tasks on a local Dask cluster")
    # The two options the command line once had: gone, so that they never silently overwrite the config.
    parser.add_argument("--segmenter", help=argparse.SUPPRESS)
    parser.add_argument("--background-removal", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, key in (("segmenter", "segmentation.backend"), ("background_removal", "images.backend")):
        if getattr(args, flag) is not None:
            parser.error(
                f"--{flag.replace('_', '-')} is gone: use --set {key}={getattr(args, flag)} "
                "(or --config configs/dataset/demo.yaml for both weights-free backends)"
            )
    # The config is read and checked before the flow starts: a bad key is one line, exit 2.
    root = DatasetRoot(Path(args.output).expanduser().resolve())
    try:
        cfg = resolve_build_config(root, args.config, args.overrides, default=DEFAULT_CONFIG)
        rebuild_plan(recorded_build_config(root), cfg, root.has_manifest("dataset"))
    except (FileNotFoundError, ConfigError) as error:
        parser.exit(2, f"error: {error}\n")
    runner = run_with_dask(args.dask_workers) if args.dask_workers else build_dataset
    summary = runner(source=args.source, output=str(root.root), config=cfg)
    print(
        f"dataset: {root.root}  config: {cfg.name} (recorded in build.yaml)  "
        f"clips per split: {summary['clips_per_split']}"
    )
    return summary


if __name__ == "__main__":
    main()
