import os

import numpy as np
import pyarrow as pa
import pytest

from storage.images import ImageError, load_photo
from storage.layout import DatasetRoot, UnsafeNameError, check_safe_name
from storage.video import fit_crop, resample_cfr


def test_paths_outside_the_root_are_refused(tmp_path):
    root = DatasetRoot.create(tmp_path / "out")
    with pytest.raises(UnsafeNameError):
        root.path("../escape.txt")
    with pytest.raises(UnsafeNameError):
        root.path("video_clips/../../escape.mp4")
    assert root.path("video_clips/a.mp4") == root.root / "video_clips/a.mp4"


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "RING\u00e9001", "", ".hidden", "a\\b", "x" * 129])
def test_unsafe_names(name):
    with pytest.raises(UnsafeNameError):
        check_safe_name(name)


def test_atomic_file_leaves_nothing_when_the_block_fails(tmp_path):
    root = DatasetRoot.create(tmp_path)
    with pytest.raises(RuntimeError):
        with root.atomic_file("video_clips/x.mp4") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path / "video_clips") == []


def test_atomic_dir_replaces_a_finished_dir_whole(tmp_path):
    root = DatasetRoot.create(tmp_path)
    with root.atomic_dir("masks/k") as d:
        (d / "00000.png").write_bytes(b"old")
        (d / "00001.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with root.atomic_dir("masks/k") as d:
            (d / "00000.png").write_bytes(b"new")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path / "masks/k")) == ["00000.png", "00001.png"]
    with root.atomic_dir("masks/k") as d:
        (d / "00000.png").write_bytes(b"new")
    assert os.listdir(tmp_path / "masks/k") == ["00000.png"]
    assert [n for n in os.listdir(tmp_path / "masks") if n != "k"] == []


def test_unwritable_output_is_a_clear_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        DatasetRoot.create(target / "out")


def test_manifest_round_trip_and_schema_check(tmp_path):
    root = DatasetRoot.create(tmp_path)
    row = {"stage": "scenes", "product_id": "P1", "clip_id": None, "item": "x", "reason_code": "c", "reason": "r"}
    root.write_manifest("rejects", [row])
    assert root.read_manifest("rejects").to_pylist() == [row]
    with pytest.raises(ValueError, match="reason_code"):
        root.write_manifest("rejects", [{**row, "reason_code": None}])
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        root.write_manifest(
            "products",
            [{"product_id": "P", "category": "c", "caption": "", "prompt": "p", "num_videos": "two", "num_images": 3}],
        )


def test_resample_cfr_from_variable_frame_rate():
    # 0.0, 0.1, 0.15, 0.4 s -> at 10 fps: frames shown at 0.0, 0.1, 0.2 (=0.15's), 0.3 (=0.15's), 0.4
    frames = [(t, np.full((1, 1, 3), i, np.uint8)) for i, t in enumerate([0.0, 0.1, 0.15, 0.4])]
    out = [int(img[0, 0, 0]) for _, img in resample_cfr(frames, 10.0)]
    assert out == [0, 1, 2, 2, 3]


def test_fit_crop_keeps_the_centre_of_portrait_sources():
    img = np.zeros((1280, 720, 3), np.uint8)
    img[630:650, 350:370] = 255  # a marker at the centre
    out = fit_crop(img, 480, 720)
    assert out.shape == (480, 720, 3)
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert abs(ys.mean() - 240) < 3 and abs(xs.mean() - 360) < 3


def test_photos_in_odd_formats_are_converted(tmp_path):
    from PIL import Image

    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(tmp_path / "deep.png")
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[10:20, 10:30] = (200, 10, 10, 255)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    rgb, alpha = load_photo(tmp_path / "cmyk.jpg")
    assert rgb.shape == (30, 40, 3) and alpha is None and rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60
    rgb, _ = load_photo(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8 and rgb.min() == 255
    rgb, alpha = load_photo(tmp_path / "alpha.png")
    assert alpha is not None and alpha.sum() == 10 * 20 * 255


def test_bad_photos_are_reject_errors(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, code in (("text.jpg", "image_unreadable"), ("empty.png", "image_empty")):
        with pytest.raises(ImageError) as err:
            load_photo(tmp_path / name)
        assert err.value.code == code
