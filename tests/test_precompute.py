"""Precompute on a built tiny dataset: stored tensors per product and clip window, manifest,
caching per product, incremental runs, missing / corrupt latents."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from flows.train import precompute
from models.pipeline import encode_reference_photos, encode_video, fill_masked
from storage.hashing import sha256_file
from storage.layout import DatasetRoot
from tasks.training.precompute import (
    LatentsError,
    LatentSpec,
    _encoders,
    load_clip_window,
    load_clip_windows,
    load_product_photos,
    precompute_product,
    product_items,
    window_starts,
)
from tasks.training.train import TrainData, TrainingError
from tests.fixtures_dataset import TINY_CONFIG, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_precompute(dataset, data_dir, extra=()):
    overrides = [f"data.root={dataset}", f"mlflow.data_dir={data_dir}", *extra]
    return precompute(config=str(TINY_CONFIG), overrides=overrides)


@pytest.fixture(scope="module")
def dataset(tiny_dataset, tmp_path_factory):
    """A private copy of the built dataset, without latents or stage cache: the cache key holds
    the root, so this module starts from nothing whatever other modules precomputed."""
    copy = tmp_path_factory.mktemp("precompute") / "dataset"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".cache", "latents", "latents.parquet"))
    return copy


@pytest.fixture(scope="module")
def newcomer(dataset):
    return pq.read_table(dataset / "manifests/dataset.parquet").column("product_id")[0].as_py()


@pytest.fixture(scope="module")
def runs(dataset, newcomer, tiny_data_dir):
    """Precompute the dataset as it was before `newcomer` arrived, then with it, then again."""
    manifest = dataset / "manifests/dataset.parquet"
    full = pq.read_table(manifest)
    pq.write_table(full.filter(full.column("product_id").to_numpy() != newcomer), manifest)
    before = run_precompute(dataset, tiny_data_dir)
    pq.write_table(full, manifest)
    return before, run_precompute(dataset, tiny_data_dir), run_precompute(dataset, tiny_data_dir)


@pytest.fixture(scope="module")
def first_run(runs):
    return runs[1]


def test_a_new_product_is_encoded_alone_and_a_rerun_is_cached(runs, newcomer):
    before, added, again = runs
    products = {r["product_id"] for r in added["rows"]}
    assert newcomer in products and newcomer not in {r["product_id"] for r in before["rows"]}
    assert (before["ran"], before["cached"]) == (len(products) - 1, 0)
    assert (added["ran"], added["cached"]) == (1, len(products) - 1)
    assert (again["ran"], again["cached"]) == (0, len(products))


def test_precompute_releases_its_encoders_for_training(runs, dataset, tiny_data_dir):
    """Training follows in the same process: the encoders must not stay loaded (docs/poc.md)."""
    _encoders(LatentSpec.from_run_config(tiny_run_config(dataset, tiny_data_dir)))
    assert _encoders.cache_info().currsize == 1
    run_precompute(dataset, tiny_data_dir)
    assert _encoders.cache_info().currsize == 0


def test_every_clip_gets_its_tensors_and_a_manifest_row(first_run, dataset, tiny_data_dir):
    cfg = tiny_run_config(dataset, tiny_data_dir)
    clips = pq.read_table(dataset / "manifests/dataset.parquet").to_pylist()
    manifest = {r["clip_key"]: r for r in pq.read_table(dataset / "manifests/latents.parquet").to_pylist()}
    assert first_run["rejects"] == [] and set(manifest) == {r["clip_key"] for r in clips}
    assert {r["split"] for r in manifest.values()} == {"train", "val", "test"}
    # 9 frames at 64 x 96 -> 3 latent frames of 8 x 12; 16 UMT5 tokens of 32; photos one latent frame each.
    for row in clips:
        entry = manifest[row["clip_key"]]
        signature = first_run["signature"]
        assert entry["path"] == f"latents/{signature}/{row['product_id']}/{row['clip_key']}-w0.safetensors"
        assert entry["product_path"] == f"latents/{signature}/{row['product_id']}/photos.safetensors"
        assert entry["sha256"] == sha256_file(dataset / entry["path"])[0] and entry["window"] == 0
        tensors = load_file(dataset / entry["path"])
        photos = load_file(dataset / entry["product_path"])
        images = min(len(row["product_images"]), cfg.data.max_product_images)
        assert (
            {k: list(v.shape) for k, v in tensors.items()}
            == json.loads(entry["shapes"])
            == {
                "latents": [16, 3, 8, 12],
                "masked_latents": [16, 3, 8, 12],
                "packed_mask": [4, 3, 8, 12],
                "text_embeds": [16, 32],
            }
        )
        assert (
            {k: list(v.shape) for k, v in photos.items()}
            == json.loads(entry["product_shapes"])
            == {"reference_latents": [images, 16, 8, 12]}
        )
        assert entry["num_images"] == images and tensors["packed_mask"].max() > 0


def test_stored_tensors_are_the_specifications_encodings(first_run, dataset, tiny_data_dir):
    """Masked latents come from clip + mask with the grey fill; reference latents are the photos
    on their neutral canvas, encoded once per product."""
    cfg = tiny_run_config(dataset, tiny_data_dir)
    row = pq.read_table(dataset / "manifests/dataset.parquet").to_pylist()[0]
    root = DatasetRoot(dataset)
    video, mask = load_clip_window(root, row["video_path"], row["mask_dir"], 9, 1, 64, 96)
    assert mask.sum() > 0 and video[:, mask[0] > 0].abs().sum() > 0
    vae = _encoders(LatentSpec.from_run_config(cfg))[1].vae  # (spec, encoders, lock)
    expected = encode_video(vae, fill_masked(video, mask, "grey").unsqueeze(0))[0]
    folder = dataset / f"latents/{first_run['signature']}/{row['product_id']}"
    stored = load_file(folder / f"{row['clip_key']}-w0.safetensors")
    torch.testing.assert_close(stored["masked_latents"], expected)
    assert not torch.allclose(stored["masked_latents"], stored["latents"])
    photos = load_product_photos(root, row["product_images"], cfg.data.max_product_images)
    torch.testing.assert_close(
        load_file(folder / "photos.safetensors")["reference_latents"], encode_reference_photos(vae, photos, 64, 96)
    )


def test_several_windows_per_clip_cover_the_clip(first_run, dataset, tiny_data_dir, tmp_path):
    assert window_starts(100, 9, 2, 3) == [0, 42, 83] and window_starts(17, 9, 2, 3) == [0]
    with pytest.raises(Exception, match="needs 17"):
        window_starts(16, 9, 2, 1)
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns(".cache", "latents", "latents.parquet"))
    result = run_precompute(copy, tiny_data_dir, ["data.windows_per_clip=3"])
    row = pq.read_table(copy / "manifests/dataset.parquet").to_pylist()[0]
    windows = load_clip_windows(DatasetRoot(copy), row["video_path"], row["mask_dir"], 9, 1, 64, 96, 3)
    per_clip = [r["window"] for r in result["rows"] if r["clip_key"] == row["clip_key"]]
    assert per_clip == list(range(len(windows))) and len(windows) == 3
    assert not torch.equal(windows[0][0], windows[-1][0])  # the windows are different frames


def test_a_changed_product_photo_reencodes_only_that_product(first_run, dataset, tiny_data_dir):
    images = dataset / "manifests/product_images.parquet"
    table = pq.read_table(images)
    rows = table.to_pylist()
    shutil.copy(images, images.with_suffix(".bak"))
    try:
        rows[0]["sha256"] = "0" * 64  # what a re-cut photo of one product looks like to the cache key
        pq.write_table(table.from_pylist(rows, schema=table.schema), images)
        result = run_precompute(dataset, tiny_data_dir)
    finally:
        shutil.move(images.with_suffix(".bak"), images)
    products = len({r["product_id"] for r in first_run["rows"]})
    assert (result["ran"], result["cached"]) == (1, products - 1)


def test_missing_or_corrupt_latents_are_named_and_recreated(first_run, dataset, tiny_data_dir):
    cfg = tiny_run_config(dataset, tiny_data_dir)
    train_rows = [r for r in first_run["rows"] if r["split"] == "train"]
    victim, gone = dataset / train_rows[0]["path"], dataset / train_rows[1]["path"]
    victim.write_bytes(victim.read_bytes()[:100])
    gone.unlink()
    with pytest.raises(LatentsError, match=f"{train_rows[0]['clip_key']}.*re-run precompute"):
        TrainData.load(cfg)
    result = run_precompute(dataset, tiny_data_dir)
    assert result["ran"] == len({train_rows[0]["product_id"], train_rows[1]["product_id"]})
    assert len(TrainData.load(cfg).rows) == len(train_rows)


def test_a_clip_too_short_for_the_window_is_set_aside(first_run, dataset, tiny_data_dir):
    cfg = tiny_run_config(dataset, tiny_data_dir, ["data.frames=101"])
    product = product_items(DatasetRoot(dataset))[0]
    result = precompute_product(product, str(dataset), LatentSpec.from_run_config(cfg))
    assert result["rows"] == [] and len(result["rejects"]) == len(product["clips"])
    assert result["rejects"][0]["reason_code"] == "clip_too_short"
    assert "needs 101" in result["rejects"][0]["reason"]


def test_an_empty_train_split_is_a_clear_error(first_run, dataset, tiny_data_dir, tmp_path):
    root = tmp_path / "dataset"
    (root / "manifests").mkdir(parents=True)
    latents = pq.read_table(dataset / "manifests/latents.parquet")
    pq.write_table(latents.filter(latents.column("split").to_numpy() != "train"), root / "manifests/latents.parquet")
    cfg = tiny_run_config(root, tiny_data_dir)
    with pytest.raises(TrainingError, match="train split .* has no precomputed clips"):
        TrainData.load(cfg)
