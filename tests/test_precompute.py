"""Precompute on a built tiny dataset: stored tensors, manifest, caching, incremental runs,
missing / corrupt latents."""
import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from flows.train import precompute
from models.pipeline import encode_video
from storage.hashing import sha256_file
from storage.layout import DatasetRoot
from tasks.precompute import LatentsError, LatentSpec, _encoders, load_clip_window, precompute_clip
from tasks.train import TrainData, TrainingError
from tests.issue4_fixtures import TINY_CONFIG, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_precompute(dataset, data_dir):
    overrides = [f"data.root={dataset}", f"mlflow.data_dir={data_dir}"]
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
    newcomer_clips = [r for r in added["rows"] if r["product_id"] == newcomer]
    assert newcomer_clips and newcomer not in {r["product_id"] for r in before["rows"]}
    assert (before["ran"], before["cached"]) == (len(before["rows"]), 0)
    assert (added["ran"], added["cached"]) == (len(newcomer_clips), len(before["rows"]))
    assert (again["ran"], again["cached"]) == (0, len(added["rows"]))


def test_every_clip_gets_its_tensors_and_a_manifest_row(first_run, dataset, tiny_data_dir):
    cfg = tiny_run_config(dataset, tiny_data_dir)
    clips = pq.read_table(dataset / "manifests/dataset.parquet").to_pylist()
    manifest = {r["clip_key"]: r for r in pq.read_table(dataset / "manifests/latents.parquet").to_pylist()}
    assert first_run["rejects"] == [] and set(manifest) == {r["clip_key"] for r in clips}
    assert {r["split"] for r in manifest.values()} == {"train", "val", "test"}
    # 9 frames at 64 x 96 -> 3 latent frames of 8 x 12; 16 UMT5 tokens of 32; 17 CLIP tokens of 32.
    for row in clips:
        entry = manifest[row["clip_key"]]
        assert entry["path"] == f"latents/{first_run['signature']}/{row['clip_key']}.safetensors"
        assert entry["sha256"] == sha256_file(dataset / entry["path"])[0]
        tensors = load_file(dataset / entry["path"])
        images = min(len(row["product_images"]), cfg.data.max_product_images)
        assert {k: list(v.shape) for k, v in tensors.items()} == json.loads(entry["shapes"]) == {
            "latents": [16, 3, 8, 12], "masked_latents": [16, 3, 8, 12], "packed_mask": [4, 3, 8, 12],
            "text_embeds": [16, 32], "image_tokens": [images, 17, 32]}
        assert entry["num_images"] == images and tensors["packed_mask"].max() > 0


def test_masked_latents_come_from_clip_times_inverse_mask(first_run, dataset, tiny_data_dir):
    cfg = tiny_run_config(dataset, tiny_data_dir)
    row = pq.read_table(dataset / "manifests/dataset.parquet").to_pylist()[0]
    root = DatasetRoot(dataset)
    video, mask = load_clip_window(root, row["video_path"], row["mask_dir"], 9, 1, 64, 96)
    assert mask.sum() > 0 and video[:, mask[0] > 0].abs().sum() > 0
    vae = _encoders(LatentSpec.from_run_config(cfg)).vae
    expected = encode_video(vae, (video * (1 - mask)).unsqueeze(0))[0]
    stored = load_file(dataset / f"latents/{first_run['signature']}/{row['clip_key']}.safetensors")
    torch.testing.assert_close(stored["masked_latents"], expected)
    assert not torch.allclose(stored["masked_latents"], stored["latents"])


def test_a_changed_product_photo_reencodes_only_that_products_clips(first_run, dataset, tiny_data_dir):
    images = dataset / "manifests/product_images.parquet"
    table = pq.read_table(images)
    rows = table.to_pylist()
    changed = rows[0]["product_id"]
    shutil.copy(images, images.with_suffix(".bak"))
    try:
        rows[0]["sha256"] = "0" * 64  # what a re-cut photo of one product looks like to the cache key
        pq.write_table(table.from_pylist(rows, schema=table.schema), images)
        result = run_precompute(dataset, tiny_data_dir)
    finally:
        shutil.move(images.with_suffix(".bak"), images)
    clips = sum(1 for r in first_run["rows"] if r["product_id"] == changed)
    assert (result["ran"], result["cached"]) == (clips, len(first_run["rows"]) - clips)


def test_missing_or_corrupt_latents_are_named_and_recreated(first_run, dataset, tiny_data_dir):
    cfg = tiny_run_config(dataset, tiny_data_dir)
    train_rows = [r for r in first_run["rows"] if r["split"] == "train"]
    victim, gone = dataset / train_rows[0]["path"], dataset / train_rows[1]["path"]
    victim.write_bytes(victim.read_bytes()[:100])
    gone.unlink()
    with pytest.raises(LatentsError, match=f"{train_rows[0]['clip_key']}.*re-run precompute"):
        TrainData.load(cfg)
    result = run_precompute(dataset, tiny_data_dir)
    assert result["ran"] == 2
    assert len(TrainData.load(cfg).rows) == len(train_rows)


def test_a_clip_too_short_for_the_window_is_set_aside(first_run, dataset, tiny_data_dir):
    cfg = tiny_run_config(dataset, tiny_data_dir, ["data.frames=101"])
    item = pq.read_table(dataset / "manifests/dataset.parquet").to_pylist()[0]
    result = precompute_clip(item, str(dataset), LatentSpec.from_run_config(cfg))
    assert result["rows"] == [] and result["rejects"][0]["reason_code"] == "clip_too_short"
    assert "needs 101" in result["rejects"][0]["reason"]


def test_an_empty_train_split_is_a_clear_error(first_run, dataset, tiny_data_dir, tmp_path):
    root = tmp_path / "dataset"
    (root / "manifests").mkdir(parents=True)
    latents = pq.read_table(dataset / "manifests/latents.parquet")
    pq.write_table(latents.filter(latents.column("split").to_numpy() != "train"), root / "manifests/latents.parquet")
    cfg = tiny_run_config(root, tiny_data_dir)
    with pytest.raises(TrainingError, match="train split .* has no precomputed clips"):
        TrainData.load(cfg)
