"""build-dataset end to end on tiny synthetic sources: outputs, rejects, caching, Dask."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from demo.bad_inputs import add_bad_inputs
from demo.studio import StudioConfig, generate_studio
from flows.build_dataset import build_dataset, run_with_dask
from storage.images import load_mask_png
from tasks.dataset.scenes import SceneConfig
from tasks.dataset.segment import SegmentConfig

pytestmark = pytest.mark.slow
SMALL = SceneConfig(min_short_side=None, height=96, width=144, min_clip_s=1.0, max_clip_s=3.0)
STAGES = ("scenes", "segment", "masking", "product_images")


def run(source: Path, output: Path, runner=build_dataset, **params) -> tuple[dict, dict[str, Counter]]:
    """Run the flow; return its summary and, per stage, how many task runs ran vs came from cache."""
    summary = runner(source=str(source), output=str(output), segmenter="classic", background_removal="classic",
                     **({"scenes": SMALL} | params))
    return summary, {stage: Counter({k: v for k, v in c.items() if v}) for stage, c in summary["task_runs"].items()}


def manifest(output: Path, name: str, key: str) -> list[dict]:
    return sorted(pq.read_table(output / "manifests" / f"{name}.parquet").to_pylist(), key=lambda r: (r[key], json.dumps(r, sort_keys=True, default=str)))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studio")
    generate_studio(root / "source", root / "truth", StudioConfig.tiny(num_products=4, seed=3))
    return root / "source"


@pytest.fixture(scope="module")
def first_build(tiny_source, tmp_path_factory):
    output = tmp_path_factory.mktemp("build") / "dataset"
    summary, work = run(tiny_source, output)
    return output, summary, work


def test_outputs_follow_the_layout_and_the_seed_schema(first_build):
    output, summary, work = first_build
    assert all(w["cached"] == 0 and w["ran"] > 0 for w in work.values())
    dataset = json.loads((output / "dataset.json").read_text())
    assert set(dataset) == {"train", "val", "test"}
    entries = [e for split in dataset.values() for e in split]
    assert entries and len(entries) == summary["items"]["dataset"]
    products = {split: {e["product_id"] for e in dataset[split]} for split in dataset}
    assert not (products["train"] & products["val"] or products["train"] & products["test"] or products["val"] & products["test"])
    for e in entries:
        assert set(e) == {"product_id", "clip_id", "video_path", "masked_video_path", "mask_dir", "product_images", "caption", "num_frames", "fps"}
        assert (output / e["video_path"]).is_file() and (output / e["masked_video_path"]).is_file()
        masks = sorted((output / e["mask_dir"]).glob("*.png"))
        assert len(masks) == e["num_frames"] and [m.name for m in masks][:2] == ["00000.png", "00001.png"]
        assert load_mask_png(masks[0]).shape == (SMALL.height, SMALL.width)
        assert 3 <= len(e["product_images"]) <= 5 and all((output / p).is_file() for p in e["product_images"])
        assert e["fps"] == 24.0 and e["video_path"] == f"video_clips/{e['product_id']}_{e['clip_id']}.mp4"
    leftovers = [p for p in output.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == []


def test_rerun_with_nothing_changed_does_no_work(first_build, tiny_source):
    output, summary, _ = first_build
    before = {n: manifest(output, n, "product_id") for n in ("clips", "masks", "masked_videos", "product_images", "dataset")}
    again, work = run(tiny_source, output)
    assert {k: v for k, v in again.items() if k != "task_runs"} == {k: v for k, v in summary.items() if k != "task_runs"}
    assert all(w["ran"] == 0 and w["cached"] > 0 for w in work.values()), work
    assert {n: manifest(output, n, "product_id") for n in before} == before


def test_incremental_builds_do_only_the_work_that_changed(tiny_source, tmp_path):
    source, output = tmp_path / "source", tmp_path / "dataset"
    shutil.copytree(tiny_source, source)
    first, _ = run(source, output)
    splits_before = {r["product_id"]: r["split"] for r in manifest(output, "dataset", "product_id")}

    # One new product: only its videos and photos are processed.
    generate_studio(tmp_path / "extra", tmp_path / "extra-truth", StudioConfig.tiny(num_products=1, seed=99))
    new_dir = next(p for p in (tmp_path / "extra").iterdir() if p.is_dir())
    shutil.copytree(new_dir, source / f"NEW{new_dir.name}")
    grown, work = run(source, output)
    assert grown["items"]["products"] == first["items"]["products"] + 1
    assert work["product_images"] == Counter(ran=1, cached=first["items"]["products"])
    assert work["scenes"]["ran"] == len(list((new_dir / "videos").iterdir()))
    splits_after = {r["product_id"]: r["split"] for r in manifest(output, "dataset", "product_id")}
    assert all(splits_after[p] == s for p, s in splits_before.items())

    # A segmentation option: segmentation and masking run again, nothing else.
    _, work = run(source, output, segmentation=SegmentConfig(dilate_px=2))
    assert work["scenes"]["ran"] == 0 and work["product_images"]["ran"] == 0
    assert work["segment"]["ran"] > 0 and work["segment"]["cached"] == 0
    assert work["masking"]["ran"] > 0 and work["masking"]["cached"] == 0


def test_bad_inputs_become_reject_rows(tmp_path):
    source = tmp_path / "source"
    # Every good video is 720p (the default resolution filter applies), one short shot; photos small.
    short = StudioConfig(num_products=2, seed=5, videos_per_product=(1, 1), shots_per_video=(1, 1), shot_seconds=(1.5, 1.5), image_size=96, portrait_fraction=0.0)
    generate_studio(source, tmp_path / "truth", short)
    expected = add_bad_inputs(source, short)
    output = tmp_path / "dataset"
    summary, _ = run(source, output, scenes=SMALL.model_copy(update={"min_short_side": 720}))
    rejects = pq.read_table(output / "manifests" / "rejects.parquet").to_pylist()
    images = pq.read_table(output / "manifests" / "product_images.parquet").to_pylist()
    for what, description in expected.items():
        code = description.split(":")[0]
        if code == "kept":
            assert any(r["source_name"] == Path(what).name and what.startswith(r["product_id"] + "/") for r in images), what
        elif code == "index_duplicate_kept":
            assert any(p["product_id"] == what.split(":")[1] for p in pq.read_table(output / "manifests/products.parquet").to_pylist())
        else:
            hits = [r for r in rejects if r["reason_code"] == code and (what in r["item"] or r["product_id"] == what or what.endswith(r["item"]))]
            assert hits, f"no {code!r} reject for {what!r}; rejects: {Counter(r['reason_code'] for r in rejects)}"
    assert all(r["reason"] for r in rejects)
    assert summary["items"]["dataset"] > 0  # the good products made it through
    outside = [p for p in tmp_path.iterdir() if p.name not in ("source", "truth", "dataset")]
    assert outside == []


def test_dask_cluster_of_two_processes_gives_the_same_manifests(first_build, tiny_source, tmp_path):
    output, _, _ = first_build
    dask_output = tmp_path / "dataset"
    run(tiny_source, dask_output, runner=run_with_dask(2))
    for name, key in (("clips", "clip_key"), ("masks", "clip_key"), ("masked_videos", "clip_key"), ("product_images", "image_path"), ("dataset", "clip_key"), ("rejects", "item")):
        assert manifest(dask_output, name, key) == manifest(output, name, key), name
