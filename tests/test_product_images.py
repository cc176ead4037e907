"""Product images stage: background removal (rembg on a real ONNX session, classic), cut-out
geometry, odd inputs, and the product-level rules (too few photos, surplus views)."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from models.background import classic_alpha, rembg_alpha, rembg_session
from storage.errors import SystemicError
from storage.images import load_photo
from storage.schemas import to_table
from tasks.dataset.product_images import ImageConfig, process_product_images, view_names

BACKDROP = (236, 236, 232)
PRODUCT = (180, 40, 30)
CLASSIC = ImageConfig(backend="classic")


def studio_photo(
    h: int = 240, w: int = 320, box: tuple[int, int, int, int] | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A product (rectangle with a rounded cap and a white label) on a slightly noisy backdrop,
    and its true mask. `box` = (y0, y1, x0, x1) of the rectangle."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = BACKDROP
    rgb += rng.normal(0, 2.0, rgb.shape)
    y0, y1, x0, x1 = box or (h // 4, 3 * h // 4, w // 3, 2 * w // 3)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    cv2.ellipse(mask, ((x0 + x1) // 2, y0), ((x1 - x0) // 2, (y1 - y0) // 6), 0, 180, 360, 1, -1)
    rgb[mask.astype(bool)] = PRODUCT
    # A label the colour of the backdrop: hole filling must keep it as product.
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    rgb[cy - 8 : cy + 8, cx - 12 : cx + 12] = BACKDROP
    return np.clip(rgb, 0, 255).astype(np.uint8), mask.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def source_row(path: Path, product_id: str = "P1") -> dict:
    data = path.read_bytes()
    return {
        "product_id": product_id,
        "role": "image",
        "name": path.name,
        "uri": str(path),
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_photos(folder: Path, names: list[str], **photo_kw) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names):
        rgb, _ = studio_photo(seed=i, **photo_kw)
        Image.fromarray(rgb).save(folder / name, quality=92)
        rows.append(source_row(folder / name))
    return rows


def header_only_png(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming width x height, with no pixel data: costs nothing to make."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def tiny_u2net(path: Path) -> Path:
    """A one-layer "u2net": 1x1 conv scoring dark pixels high, with rembg's layout
    (input 1 x 3 x 320 x 320 normalised RGB, first output 1 x 1 x 320 x 320)."""
    weight = numpy_helper.from_array(np.full((1, 3, 1, 1), -1.0, np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "weight"], ["d0"])],
        "tiny_u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("d0", TensorProto.FLOAT, [1, 1, 320, 320])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_classic_backend_finds_the_product_shape(tmp_path):
    rgb, truth = studio_photo(480, 640)
    Image.fromarray(rgb).save(tmp_path / "p.jpg", quality=90)
    photo, _ = load_photo(tmp_path / "p.jpg")
    assert iou(classic_alpha(photo) > 0.5, truth) >= 0.9


def test_cutouts_are_square_rgba_with_aspect_ratio_kept(tmp_path):
    # A 2:1 product (200 x 100 px box) in each photo.
    images = write_photos(tmp_path / "src", ["front.jpg", "side.jpg", "back.jpg"], box=(70, 170, 60, 260))
    result = process_product_images("P1", images, str(tmp_path / "out"), CLASSIC)

    assert result["rejects"] == []
    assert [r["view"] for r in result["rows"]] == ["front", "side", "back"]
    to_table("product_images", result["rows"])  # rows fit the manifest schema
    for row in result["rows"]:
        file = tmp_path / "out" / row["image_path"]
        assert row["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert row["background_removal"] == "classic"
        img = Image.open(file)
        assert (img.mode, img.size) == ("RGBA", (512, 512))
        alpha = np.asarray(img)[..., 3]
        ys, xs = np.nonzero(alpha > 127)
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert width / height == pytest.approx(200 / 117, rel=0.05)  # box + its rounded cap
        assert width >= 0.9 * 512  # the product fills the square, less the margin
        assert alpha[:40].max() == 0 and alpha[-40:].max() == 0  # transparent padding
        assert 0.2 < row["foreground_fraction"] < 0.4


def test_cmyk_16bit_and_alpha_photos_are_used(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgb, truth = studio_photo()
    Image.fromarray(rgb).convert("CMYK").save(src / "front.jpg", quality=92)
    grey16 = (rgb.astype(np.float32).mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(src / "side.png")  # mode I;16
    assert Image.open(src / "side.png").mode.startswith("I")
    # The colour under the alpha is the product's everywhere: only the alpha channel can tell.
    rgba = np.zeros((*truth.shape, 4), np.uint8)
    rgba[..., :3] = PRODUCT
    rgba[..., 3] = truth * 255
    Image.fromarray(rgba).save(src / "back.png")
    images = [source_row(src / n) for n in ("front.jpg", "side.png", "back.png")]

    result = process_product_images("P1", images, str(tmp_path / "out"), CLASSIC)

    assert result["rejects"] == []
    methods = {r["view"]: r["background_removal"] for r in result["rows"]}
    assert methods == {"front": "classic", "side": "classic", "back": "alpha"}
    for row in result["rows"]:
        assert row["foreground_fraction"] == pytest.approx(truth.mean(), abs=0.02)
    back = np.asarray(Image.open(tmp_path / "out/product_images/P1/back.png"))
    assert back[back[..., 3] > 127, :3].mean(axis=0) == pytest.approx(PRODUCT, abs=2)


def test_unreadable_and_oversized_files_are_rejected_with_reasons(tmp_path):
    images = write_photos(tmp_path / "src", ["front.jpg", "side.jpg", "back.jpg"])
    (tmp_path / "src/notes.jpg").write_text("this is not a photo")
    header_only_png(tmp_path / "src/huge.png", 10_000, 8_000)  # 80 MP
    images += [source_row(tmp_path / "src/notes.jpg"), source_row(tmp_path / "src/huge.png")]

    result = process_product_images("P1", images, str(tmp_path / "out"), CLASSIC)

    assert len(result["rows"]) == 3
    codes = {Path(r["item"]).name: r["reason_code"] for r in result["rejects"]}
    assert codes == {"notes.jpg": "image_unreadable", "huge.png": "image_too_large"}
    assert "80 MP" in next(r["reason"] for r in result["rejects"] if r["reason_code"] == "image_too_large")


def test_too_few_usable_photos_rejects_the_product_and_leaves_nothing(tmp_path):
    images = write_photos(tmp_path / "src", ["front.jpg", "side.jpg"])
    Image.new("RGB", (320, 240), BACKDROP).save(tmp_path / "src/empty.jpg")  # no product in it
    images.append(source_row(tmp_path / "src/empty.jpg"))
    stale = tmp_path / "out/product_images/P1"
    stale.mkdir(parents=True)
    (stale / "old.png").write_bytes(b"from an earlier run")

    result = process_product_images("P1", images, str(tmp_path / "out"), CLASSIC)

    assert result["rows"] == []
    codes = [r["reason_code"] for r in result["rejects"]]
    assert sorted(codes) == ["foreground_too_small", "too_few_images"]
    product = next(r for r in result["rejects"] if r["reason_code"] == "too_few_images")
    assert product["item"] == "P1" and "2 usable photo(s) of 3" in product["reason"]
    assert "empty.jpg: foreground_too_small" in product["reason"]
    assert not (tmp_path / "out/product_images/P1").exists()
    assert list((tmp_path / "out/product_images").iterdir()) == []  # no temporary left either


def test_surplus_photos_keep_preferred_views(tmp_path):
    names = ["zeta.jpg", "scene.jpg", "detail.jpg", "top.jpg", "backpack.jpg", "side_left.jpg", "front.jpg"]
    images = write_photos(tmp_path / "src", names, h=120, w=160)

    result = process_product_images("P1", images, str(tmp_path / "out"), CLASSIC)

    assert [r["view"] for r in result["rows"]] == ["front", "side_left", "detail", "top", "scene"]
    surplus = [Path(r["item"]).name for r in result["rejects"] if r["reason_code"] == "image_surplus"]
    assert sorted(surplus) == ["backpack.jpg", "zeta.jpg"] and len(result["rejects"]) == 2
    files = sorted(p.name for p in (tmp_path / "out/product_images/P1").iterdir())
    assert files == ["detail.png", "front.png", "scene.png", "side_left.png", "top.png"]


def test_view_names_are_safe_and_unique():
    names = ["front.jpg", "front.png", "bad name!.jpg", "FRONT.webp", "view2.jpg"]
    assert view_names([{"name": n} for n in names]) == ["front", "front-2", "view2", "FRONT-3", "view2-2"]


def test_rembg_runs_a_real_session_on_a_local_onnx_file(tmp_path, monkeypatch):
    # The model lies outside REMBG_HOME / U2NET_HOME, where rembg alone would refuse it.
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "rembg_home"))
    model = tiny_u2net(tmp_path / "tiny_u2net.onnx")
    rgb, truth = studio_photo(480, 640)
    assert iou(rembg_alpha(rgb, str(model)) > 0.5, truth) >= 0.8

    images = write_photos(tmp_path / "src", ["front.jpg", "side.jpg", "back.jpg"])
    cfg = ImageConfig(backend="rembg", rembg_model=str(model))
    result = process_product_images("P1", images, str(tmp_path / "out"), cfg)
    assert result["rejects"] == []
    assert {r["background_removal"] for r in result["rows"]} == {"rembg:tiny_u2net.onnx"}


def test_a_model_that_cannot_load_is_systemic(tmp_path, monkeypatch):
    images = write_photos(tmp_path / "src", ["front.jpg"])
    missing = ImageConfig(rembg_model=str(tmp_path / "nowhere/u2net.onnx"))
    with pytest.raises(SystemicError, match="does not exist.*pass its path as rembg_model"):
        process_product_images("P1", images, str(tmp_path / "out"), missing)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(SystemicError, match="could not load"):
        process_product_images(
            "P1", images, str(tmp_path / "out"), ImageConfig(rembg_model=str(tmp_path / "broken.onnx"))
        )

    # A named model is downloaded on first use; here (as on any offline machine) that fails.
    import pooch

    def offline(*_args, **_kwargs):
        raise ConnectionError("no network")

    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "rembg_home"))
    monkeypatch.setattr(pooch, "retrieve", offline)
    rembg_session.cache_clear()
    with pytest.raises(SystemicError, match="'u2net' could not be loaded.*images.backend=classic"):
        process_product_images("P1", images, str(tmp_path / "out"), ImageConfig(rembg_model="u2net"))
    assert not (tmp_path / "out/product_images/P1").exists()
