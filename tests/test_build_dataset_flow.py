"""build-dataset end to end on tiny synthetic sources: outputs, rejects, caching, Dask, the
recorded build config."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from demo.bad_inputs import add_bad_inputs
from demo.studio import StudioConfig, generate_studio
from flows.build_dataset import build_dataset, main, run_with_dask
from storage.config_files import ConfigError
from storage.hashing import sha256_files
from storage.images import load_mask_png
from storage.layout import DatasetRoot
from tasks.dataset.build_config import load_build_config, recorded_build_config
from tests.fixtures_dataset import TINY_BUILD_CONFIG

pytestmark = pytest.mark.slow
TINY = load_build_config(TINY_BUILD_CONFIG)  # classic backends, 96x144 clips of 1-3 s
STAGES = ("scenes", "segment", "masking", "product_images")


def run(
    source: Path, output: Path, overrides: list[str] = (), runner=build_dataset, config=str(TINY_BUILD_CONFIG)
) -> tuple[dict, dict[str, Counter]]:
    """Run the flow; return its summary and, per stage, how many task runs ran vs came from cache."""
    summary = runner(source=str(source), output=str(output), config=config, overrides=list(overrides))
    return summary, {stage: Counter({k: v for k, v in c.items() if v}) for stage, c in summary["task_runs"].items()}


def manifest(output: Path, name: str, key: str) -> list[dict]:
    return sorted(
        pq.read_table(output / "manifests" / f"{name}.parquet").to_pylist(),
        key=lambda r: (r[key], json.dumps(r, sort_keys=True, default=str)),
    )


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
    assert not (
        products["train"] & products["val"]
        or products["train"] & products["test"]
        or products["val"] & products["test"]
    )
    for e in entries:
        assert set(e) == {
            "product_id",
            "clip_id",
            "video_path",
            "masked_video_path",
            "mask_dir",
            "product_images",
            "caption",
            "num_frames",
            "fps",
        }
        assert (output / e["video_path"]).is_file() and (output / e["masked_video_path"]).is_file()
        masks = sorted((output / e["mask_dir"]).glob("*.png"))
        assert len(masks) == e["num_frames"] and [m.name for m in masks][:2] == ["00000.png", "00001.png"]
        assert load_mask_png(masks[0]).shape == (TINY.scenes.height, TINY.scenes.width)
        assert 3 <= len(e["product_images"]) <= 5 and all((output / p).is_file() for p in e["product_images"])
        assert e["fps"] == 24.0 and e["video_path"] == f"video_clips/{e['product_id']}_{e['clip_id']}.mp4"
    leftovers = [p for p in output.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == []


def test_rerun_with_nothing_changed_does_no_work(first_build, tiny_source):
    output, summary, _ = first_build
    before = {
        n: manifest(output, n, "product_id") for n in ("clips", "masks", "masked_videos", "product_images", "dataset")
    }
    again, work = run(tiny_source, output)
    assert {k: v for k, v in again.items() if k != "task_runs"} == {
        k: v for k, v in summary.items() if k != "task_runs"
    }
    assert all(w["ran"] == 0 and w["cached"] > 0 for w in work.values()), work
    assert {n: manifest(output, n, "product_id") for n in before} == before


def test_the_dataset_records_its_config(first_build):
    output, summary, _ = first_build
    assert summary["config"] == "tiny" and summary["config_changes"] == []
    assert recorded_build_config(DatasetRoot(output)) == TINY
    # build.yaml is itself a build config: building with it builds the same way.
    assert load_build_config(output / "build.yaml") == TINY


def test_a_rebuild_without_a_config_uses_the_recorded_one(first_build, tiny_source):
    # Given no config, a root is rebuilt with the one it records (tiny's), not the default one
    # (Grounding DINO + SAM2 and 480x720 clips): nothing changed, so nothing runs.
    output, summary, _ = first_build
    again, work = run(tiny_source, output, config=None)
    assert again["config"] == "tiny" and again["config_changes"] == []
    assert all(w["ran"] == 0 and w["cached"] > 0 for w in work.values()), work
    assert again["items"] == summary["items"]


def test_splits_cannot_change_on_a_built_dataset(first_build, tiny_source, capsys):
    output, _, _ = first_build
    with pytest.raises(ConfigError, match=r"splits cannot change on a built dataset \(splits.seed: 20260123 -> 1\)"):
        run(tiny_source, output, ["splits.seed=1"])
    with pytest.raises(SystemExit) as stopped:
        main(["--source", str(tiny_source), "--output", str(output), "--set", "splits.seed=1"])
    assert stopped.value.code == 2 and "splits cannot change" in capsys.readouterr().err
    assert recorded_build_config(DatasetRoot(output)) == TINY


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
    changed, work = run(source, output, ["segmentation.dilate_px=2"])
    assert changed["config_changes"] == ["segmentation.dilate_px: 0 -> 2"]
    assert work["scenes"]["ran"] == 0 and work["product_images"]["ran"] == 0
    assert work["segment"]["ran"] > 0 and work["segment"]["cached"] == 0
    assert work["masking"]["ran"] > 0 and work["masking"]["cached"] == 0
    assert recorded_build_config(DatasetRoot(output)).segmentation.dilate_px == 2

    # Back to the first config: its cache entries name masks the dilated build has overwritten,
    # so segmentation and masking run again rather than trust them.
    back, work = run(source, output)
    assert back["config_changes"] == ["segmentation.dilate_px: 2 -> 0"]
    assert work["segment"] == Counter(ran=back["items"]["clips"]) and work["masking"]["cached"] == 0
    for row in manifest(output, "masks", "clip_key"):
        assert sha256_files(sorted((output / row["mask_dir"]).glob("*.png"))) == row["sha256"], row["clip_key"]


def test_bad_inputs_become_reject_rows(tmp_path):
    source = tmp_path / "source"
    # Every good video is 720p (the default resolution filter applies), one short shot; photos small.
    short = StudioConfig(
        num_products=2,
        seed=5,
        videos_per_product=(1, 1),
        shots_per_video=(1, 1),
        shot_seconds=(1.5, 1.5),
        image_size=96,
        portrait_fraction=0.0,
    )
    generate_studio(source, tmp_path / "truth", short)
    expected = add_bad_inputs(source, short)
    output = tmp_path / "dataset"
    summary, _ = run(source, output, ["scenes.min_short_side=720"])
    rejects = pq.read_table(output / "manifests" / "rejects.parquet").to_pylist()
    images = pq.read_table(output / "manifests" / "product_images.parquet").to_pylist()
    for what, description in expected.items():
        code = description.split(":")[0]
        if code == "kept":
            assert any(
                r["source_name"] == Path(what).name and what.startswith(r["product_id"] + "/") for r in images
            ), what
        elif code == "index_duplicate_kept":
            assert any(
                p["product_id"] == what.split(":")[1]
                for p in pq.read_table(output / "manifests/products.parquet").to_pylist()
            )
        else:
            hits = [
                r
                for r in rejects
                if r["reason_code"] == code
                and (what in r["item"] or r["product_id"] == what or what.endswith(r["item"]))
            ]
            assert hits, f"no {code!r} reject for {what!r}; rejects: {Counter(r['reason_code'] for r in rejects)}"
    assert all(r["reason"] for r in rejects)
    assert summary["items"]["dataset"] > 0  # the good products made it through
    outside = [p for p in tmp_path.iterdir() if p.name not in ("source", "truth", "dataset")]
    assert outside == []


def test_dask_cluster_of_two_processes_gives_the_same_manifests(first_build, tiny_source, tmp_path):
    output, _, _ = first_build
    dask_output = tmp_path / "dataset"
    run(tiny_source, dask_output, runner=run_with_dask(2))
    for name, key in (
        ("clips", "clip_key"),
        ("masks", "clip_key"),
        ("masked_videos", "clip_key"),
        ("product_images", "image_path"),
        ("dataset", "clip_key"),
        ("rejects", "item"),
    ):
        assert manifest(dask_output, name, key) == manifest(output, name, key), name
