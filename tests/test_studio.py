"""The synthetic studio: layout, counts, ground truth that matches the pixels, determinism, and the
bad inputs it can plant."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from demo import studio
from demo.bad_inputs import SMALL_VIDEO, add_bad_inputs
from demo.studio import KIND_PREFIX, VIEWS, StudioConfig, generate_studio
from storage.images import ImageError, load_mask_png, load_photo
from storage.layout import UnsafeNameError, check_safe_name
from storage.video import VideoError, probe, read_video

CFG = StudioConfig.tiny(num_products=3, seed=7)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("studio")
    summary = generate_studio(base / "source", base / "truth", CFG)
    return base / "source", base / "truth", summary


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_layout_and_counts(tree):
    source, truth, summary = tree
    rows = _read_csv(source / "products.csv")
    ids = [r["product_id"] for r in rows]
    assert sorted(ids) == sorted(p.name for p in source.iterdir() if p.is_dir())
    assert len(ids) == CFG.num_products == summary["products"]
    assert len({r["category"] for r in rows}) == 3  # kinds cycle: 3 products, 3 kinds
    cuts = json.loads((truth / "cuts.json").read_text())
    products = json.loads((truth / "products.json").read_text())
    assert sorted(products) == sorted(ids)
    n_images = 0
    for row in rows:
        pid, folder = row["product_id"], source / row["product_id"]
        assert re.fullmatch(r"[A-Z]{3,4}\d{4}", pid) and pid.startswith(KIND_PREFIX[row["category"]])
        assert json.loads((folder / "meta.json").read_text()) == {k: row[k] for k in ("category", "caption", "prompt")}
        assert row["prompt"] == row["category"] == products[pid]["kind"] and row["category"] in row["caption"]
        videos = sorted(f"{pid}/videos/{p.name}" for p in (folder / "videos").iterdir())
        assert CFG.videos_per_product[0] <= len(videos) <= CFG.videos_per_product[1]
        assert videos == sorted(k for k in cuts if k.startswith(pid + "/"))
        images = sorted((folder / "images").iterdir())
        assert CFG.images_per_product[0] <= len(images) <= CFG.images_per_product[1]
        assert {p.stem for p in images} <= set(VIEWS) and "front" in {p.stem for p in images}
        assert {p.suffix for p in images} <= {".jpg", ".png"}
        n_images += len(images)
    assert summary["videos"] == len(cuts) and summary["images"] == n_images
    assert summary["video_seconds"] == pytest.approx(sum(v["num_frames"] / v["fps"] for v in cuts.values()), abs=0.01)
    assert not truth.resolve().is_relative_to(source.resolve())


def _mean_abs_step(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between each frame and the next (length T - 1)."""
    return np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))


def test_cuts_match_decoded_frame_differences(tree):
    source, truth, _ = tree
    cuts = json.loads((truth / "cuts.json").read_text())
    for name, video in cuts.items():
        frames = read_video(source / name)
        assert frames.shape == (video["num_frames"], video["height"], video["width"], 3)
        steps = _mean_abs_step(frames)
        at_cuts = steps[np.asarray(video["cuts"]) - 1]
        within = np.delete(steps, np.asarray(video["cuts"]) - 1)
        # Every hard cut is a jump far above any change inside a shot: any threshold between finds them.
        assert at_cuts.min() > 12 and at_cuts.min() > 3 * within.max(), (name, at_cuts, within.max())
        lengths = np.diff([0, *video["cuts"], video["num_frames"]])
        assert CFG.shots_per_video[0] <= len(lengths) <= CFG.shots_per_video[1]
        lo, hi = (round(s * CFG.fps) for s in CFG.shot_seconds)
        assert all(lo <= n <= hi for n in lengths), lengths


def _fit_backdrop(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Quadratic colour model of the backdrop, fitted away from the product."""
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    basis = np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], -1).reshape(-1, 6)
    far = ~cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool).reshape(-1)
    coef, *_ = np.linalg.lstsq(basis[far], frame.reshape(-1, 3)[far].astype(np.float64), rcond=None)
    return (basis @ coef).reshape(h, w, 3)


def test_masks_cover_the_product_inside_the_frame(tree):
    source, truth, _ = tree
    cuts = json.loads((truth / "cuts.json").read_text())
    for name, video in cuts.items():
        pid, stem = name.split("/")[0], Path(name).stem
        files = sorted((truth / "masks" / pid / stem).iterdir())
        assert [p.name for p in files] == [f"{i:05d}.png" for i in range(video["num_frames"])]
        frames = read_video(source / name)
        for path in files:
            raw = np.asarray(Image.open(path))
            assert raw.shape == (video["height"], video["width"]) and set(np.unique(raw)) == {0, 255}
            assert not (raw[0].any() or raw[-1].any() or raw[:, 0].any() or raw[:, -1].any()), (
                path,
                "touches the edge",
            )
        for i in [0, *video["cuts"]]:  # the product stands clearly apart from the backdrop
            mask = load_mask_png(files[i])
            distance = np.linalg.norm(frames[i] - _fit_backdrop(frames[i], mask), axis=2)
            interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            outside = ~cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            assert np.percentile(distance[interior], 5) > 40, (name, i)
            assert np.percentile(distance[outside], 99) < 15, (name, i)


def test_photos_are_studio_shots_of_the_product(tree):
    source, _, _ = tree
    for path in sorted(source.glob("*/images/*")):
        rgb, alpha = load_photo(path)
        assert rgb.shape == (CFG.image_size, CFG.image_size, 3) and alpha is None
        corner = np.median(np.concatenate([rgb[:4, :4].reshape(-1, 3), rgb[-4:, -4:].reshape(-1, 3)]), axis=0)
        assert corner.min() > 190  # light studio backdrop
        product = np.linalg.norm(rgb.astype(np.float64) - corner, axis=2) > 40
        assert 0.05 < product.mean() < 0.98, path


def test_same_seed_same_bytes_other_seed_other_products(tree, tmp_path):
    source, truth, _ = tree
    studio.main(
        ["--source", str(tmp_path / "s"), "--truth", str(tmp_path / "t"), "--products", "3", "--seed", "7", "--tiny"]
    )
    assert _digest(tmp_path / "t") == _digest(truth)  # masks, cuts, products: byte-identical
    assert _digest(tmp_path / "s") == _digest(source)
    other = StudioConfig.tiny(
        num_products=1, seed=8, videos_per_product=(1, 1), shots_per_video=(2, 2), shot_seconds=(0.5, 0.5)
    )
    generate_studio(tmp_path / "s8", tmp_path / "t8", other)
    first = json.loads((truth / "products.json").read_text())
    assert (
        json.loads((tmp_path / "t8" / "products.json").read_text()).popitem()[1]["colors"]
        != next(iter(first.values()))["colors"]
    )


def test_refuses_a_non_empty_target(tree):
    source, truth, _ = tree
    with pytest.raises(FileExistsError, match="not empty"):
        generate_studio(source, truth.parent / "fresh", CFG)


def test_portrait_option_makes_portrait_videos(tmp_path):
    cfg = StudioConfig.tiny(num_products=1, portrait_fraction=1.0, videos_per_product=(1, 1), shot_seconds=(0.5, 0.5))
    summary = generate_studio(tmp_path / "s", tmp_path / "t", cfg)
    ((name, video),) = json.loads((tmp_path / "t" / "cuts.json").read_text()).items()
    assert summary["portrait_videos"] == 1 and (video["width"], video["height"]) == (cfg.height, cfg.width)
    assert read_video(tmp_path / "s" / name).shape[1:3] == (cfg.width, cfg.height)
    mask = load_mask_png(next((tmp_path / "t" / "masks").rglob("00000.png")))
    assert mask.shape == (cfg.width, cfg.height) and mask.any() and not mask[[0, -1]].any()


def test_bad_inputs_are_what_they_say(tmp_path):
    # 720p good videos as the pipeline needs, but of one 3-frame shot, and small photos.
    cfg = StudioConfig(shots_per_video=(1, 1), shot_seconds=(0.125, 0.125), image_size=96)
    expected = add_bad_inputs(tmp_path, cfg)
    src = tmp_path

    def code(exc_type, fn, path):
        with pytest.raises(exc_type) as info:
            fn(src / path)
        return info.value.code

    assert (src / "RING9001/videos/empty.mp4").stat().st_size == 0
    assert code(VideoError, probe, "RING9001/videos/empty.mp4") == "video_empty"
    assert code(VideoError, probe, "BRCL9002/videos/truncated.mp4") == "video_unreadable"
    assert code(VideoError, probe, "BOTL9003/videos/notes.mp4") == "video_unreadable"
    assert code(VideoError, probe, "BOX9004/videos/soundtrack.mp4") == "video_no_stream"
    small = probe(src / "SHOE9005/videos/small_640x360.mp4")
    assert (small.width, small.height) == SMALL_VIDEO
    assert code(ImageError, load_photo, "WTCH9006/images/extra.jpg") == "image_unreadable"
    assert code(ImageError, load_photo, "BOTL9010/images/huge.png") == "image_too_large"
    assert (src / "BOTL9010/images/huge.png").stat().st_size < 1_000_000

    kept = {k: v for k, v in expected.items() if v.startswith("kept:")}
    modes = {Image.open(src / k).mode for k in kept}
    assert modes == {"CMYK", "RGB", "RGBA"} and len(kept) == 3
    assert any(cv2.imread(str(src / k), cv2.IMREAD_UNCHANGED).dtype == np.uint16 for k in kept if k.endswith(".png"))
    for k in kept:
        rgb, alpha = load_photo(src / k)
        assert rgb.dtype == np.uint8 and rgb.shape == (96, 96, 3)
        if Image.open(src / k).mode == "RGBA":
            assert alpha is not None and alpha.min() == 0 and alpha.max() == 255

    rows = [r["product_id"] for r in _read_csv(src / "products.csv")]
    assert rows.count("MUG9016") == 2 and "products.csv:MUG9016" in expected
    assert not list((src / "BOX9011/videos").iterdir()) and len(list((src / "SHOE9012/images").iterdir())) == 2
    for pid in ("RING\u00e99013", "a..b"):
        assert (src / pid).is_dir() and pid in expected
        with pytest.raises(UnsafeNameError):
            check_safe_name(pid)
    assert (src / "WTCH9015").is_dir() and (src / "wtch9015").is_dir()

    # Apart from the planted problem, every product is valid: a good 720p video, 3 good photos.
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        pid = folder.name
        assert pid in rows and json.loads((folder / "meta.json").read_text())["category"]
        bad = {k for k in expected if k.startswith(pid + "/") and not expected[k].startswith("kept:")}
        good_videos = [p for p in (folder / "videos").iterdir() if f"{pid}/videos/{p.name}" not in bad]
        good_photos = [p for p in (folder / "images").iterdir() if f"{pid}/images/{p.name}" not in bad]
        if pid == "BOX9011":
            assert not good_videos
        else:
            info = probe(good_videos[0])
            assert len(good_videos) == 1 and min(info.width, info.height) >= 720, pid
        assert len(good_photos) == (2 if pid == "SHOE9012" else 3), pid
        for photo in good_photos:
            load_photo(photo)


def test_colourway_look_shares_shape_and_videos_and_varies_colours(tmp_path):
    cfg = StudioConfig.tiny(num_products=4, look="colourway", colourways=4, videos_per_product=(1, 1))
    generate_studio(tmp_path / "s", tmp_path / "t", cfg)
    products = json.loads((tmp_path / "t" / "products.json").read_text())
    assert len(products) == 4 and len({p["kind"] for p in products.values()}) == 1
    assert len({json.dumps(p["shape"]) for p in products.values()}) == 1
    assert len({p["colors"]["primary"] for p in products.values()}) == 4
    assert all(p["prompt"] == p["kind"] and p["texture"] in ("bands", "decal") for p in products.values())
    masks = {pid: _digest(tmp_path / "t" / "masks" / pid) for pid in products}
    assert len({json.dumps(m, sort_keys=True) for m in masks.values()}) == 1  # same shots, same true masks
    assert StudioConfig().look == "classic"  # today's look stays the default
