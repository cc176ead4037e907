import json
from collections import Counter

import pytest

from tasks.dataset.assemble import SplitConfig, assemble, assign_splits
from tasks.dataset.ingest import ingest_source


def make_product(root, pid, videos=("a.mp4",), images=("front.jpg", "side.jpg", "back.jpg"), meta=None):
    d = root / pid
    (d / "videos").mkdir(parents=True)
    (d / "images").mkdir()
    for v in videos:
        (d / "videos" / v).write_bytes(b"video " + pid.encode())
    for i in images:
        (d / "images" / i).write_bytes(b"image " + i.encode())
    if meta is not None:
        (d / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


def test_ingest_validates_and_hashes(tmp_path):
    make_product(tmp_path, "RING0001", meta={"category": "ring", "caption": "a gold ring"})
    make_product(tmp_path, "BOX0002")
    make_product(tmp_path, "a..b")
    make_product(tmp_path, "RING\u00e9001")
    make_product(tmp_path, "DUP1")
    make_product(tmp_path, "dup1")
    make_product(tmp_path, "NOVID", videos=())
    make_product(tmp_path, "FEWIMG", images=("a.jpg", "b.jpg"))
    make_product(tmp_path, "BADMETA", meta="{not json")
    make_product(tmp_path, "CSVDUP")
    (tmp_path / "RING0001" / "videos" / "notes.txt").write_text("x")
    (tmp_path / "products.csv").write_text(
        "product_id,category,caption,prompt\nBOX0002,box,a red box,\nCSVDUP,box,one,\nCSVDUP,mug,two,\nGHOST,box,,\n"
    )
    out = ingest_source(str(tmp_path), min_images=3)
    ids = {p["product_id"]: p for p in out["products"]}
    assert set(ids) == {"RING0001", "BOX0002"}
    assert ids["RING0001"]["prompt"] == "ring" and ids["RING0001"]["caption"] == "a gold ring"
    assert ids["BOX0002"]["category"] == "box" and ids["BOX0002"]["prompt"] == "box"
    codes = Counter(r["reason_code"] for r in out["rejects"])
    assert codes == Counter(
        {
            "product_id_invalid": 2,
            "product_id_duplicate": 2,
            "no_videos": 1,
            "too_few_images": 1,
            "product_metadata_invalid": 1,
            "product_metadata_conflict": 1,
            "product_missing": 1,
            "unsupported_extension": 1,
        }
    )
    files = out["source_files"]
    assert len(files) == 2 * (1 + 3)
    assert all(len(f["sha256"]) == 64 and f["size_bytes"] > 0 for f in files)


def test_ingest_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ingest_source(str(tmp_path / "nope"), min_images=3)


def test_ingest_reads_fsspec_urls(tmp_path):
    make_product(tmp_path, "P1")
    out = ingest_source(f"file://{tmp_path}", min_images=3)
    assert [p["product_id"] for p in out["products"]] == ["P1"]


def test_ingest_asks_for_the_photo_minimum_it_is_given(tmp_path):
    """One minimum for the whole build: images.min_images=2 admits a product with two photos."""
    make_product(tmp_path, "TWO", images=("a.jpg", "b.jpg"))
    assert [p["product_id"] for p in ingest_source(str(tmp_path), min_images=2)["products"]] == ["TWO"]
    rejected = ingest_source(str(tmp_path), min_images=3)["rejects"]
    assert [r["reason_code"] for r in rejected] == ["too_few_images"] and "at least 3" in rejected[0]["reason"]


def test_splits_are_stratified_sticky_and_disjoint():
    cats = {f"{c}{i:03d}": c for c in ("ring", "box") for i in range(50)}
    cfg = SplitConfig()
    splits = assign_splits(cats, {}, cfg)
    for c in ("ring", "box"):
        counts = Counter(s for p, s in splits.items() if cats[p] == c)
        assert counts == {"train": 40, "val": 5, "test": 5}
    assert assign_splits(cats, {}, cfg) == splits  # fixed seed
    more = cats | {f"ring{i:03d}": "ring" for i in range(50, 60)}
    grown = assign_splits(more, splits, cfg)
    assert all(grown[p] == s for p, s in splits.items())  # nobody moves
    counts = Counter(s for p, s in grown.items() if more[p] == "ring")
    assert counts == {"train": 48, "val": 6, "test": 6}
    assert assign_splits(cats, {}, SplitConfig(seed=1)) != splits


def test_assemble_joins_stages_and_writes_the_seed_schema():
    products = [
        {"product_id": p, "category": "box", "caption": f"{p} cap", "prompt": "box", "num_videos": 1, "num_images": 3}
        for p in ("A", "B", "C")
    ]
    clips = [
        {
            "clip_key": f"{p}_c1",
            "product_id": p,
            "clip_id": "c1",
            "video_path": f"video_clips/{p}_c1.mp4",
            "num_frames": 72,
            "fps": 24.0,
        }
        for p in ("A", "B", "C")
    ]
    masks = [{"clip_key": k, "mask_dir": f"masks/{k}/"} for k in ("A_c1", "B_c1", "C_c1")]
    masked = [
        {"clip_key": k, "masked_video_path": f"masked_videos/{k}.mp4"} for k in ("A_c1", "C_c1")
    ]  # B lost its masked video
    images = [
        {"product_id": p, "image_path": f"product_images/{p}/{v}.png"}
        for p in ("A", "B")
        for v in ("front", "side", "back")
    ]  # C has no photos
    rows, ds, rejects = assemble(products, clips, masks, masked, images, {}, SplitConfig())
    assert [r["clip_key"] for r in rows] == ["A_c1"]
    assert [r["reason_code"] for r in rejects] == ["no_usable_clips"] and rejects[0]["product_id"] == "B"
    entry = ds["train"][0]
    assert list(entry) == [
        "product_id",
        "clip_id",
        "video_path",
        "masked_video_path",
        "mask_dir",
        "product_images",
        "caption",
        "num_frames",
        "fps",
    ]
    assert entry["product_images"] == [
        "product_images/A/back.png",
        "product_images/A/front.png",
        "product_images/A/side.png",
    ]
    assert ds["val"] == [] and ds["test"] == []


def test_many_small_categories_still_fill_val_and_test():
    cats = {f"p{i:02d}": f"cat{i % 12}" for i in range(12)}  # 12 categories of one product
    counts = Counter(assign_splits(cats, {}, SplitConfig()).values())
    assert counts["val"] >= 1 and counts["test"] >= 1 and counts["train"] >= 8
