"""Products and files a robust ingest must set aside, added to a SOURCE tree (see demo/studio.py).

Each bad product is otherwise valid (a good >= 720p video, 3 good photos, meta.json, a row in
products.csv), so exactly the planted problem is what is wrong with it. `add_bad_inputs` returns
{what (path relative to SOURCE, or a product id): "expected reason_code: explanation"}; entries
starting with "kept:" are unusual but valid inputs the pipeline must convert and use.
"""

from __future__ import annotations

import argparse
import csv
import json
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

from demo.studio import (
    VIEWS,
    ProductSpec,
    StudioConfig,
    random_product,
    render_photo,
    write_photos,
    write_product,
    write_showcase_video,
)

SMALL_VIDEO = (640, 360)
HUGE_IMAGE_SIDE = 20_000  # 400 MP declared, far above the 64 MP decompression-bomb limit


def _product(
    rng: np.random.Generator,
    source: Path,
    product_id: str,
    kind: str,
    cfg: StudioConfig,
    videos: int = 1,
    images: int = 3,
) -> ProductSpec:
    """Write a valid product folder with `videos` showcase videos and `images` photos."""
    spec = random_product(rng, kind, product_id)
    if videos:
        one = cfg.model_copy(
            update={
                "videos_per_product": (videos, videos),
                "images_per_product": (images, images),
                "portrait_fraction": 0.0,
            }
        )
        write_product(rng, spec, one, source, truth=None)
    else:
        folder = source / product_id
        (folder / "videos").mkdir(parents=True)
        write_photos(rng, spec, folder / "images", list(VIEWS[:images]), cfg.image_size, "jpg")
        (folder / "meta.json").write_text(json.dumps(spec.meta(), indent=2) + "\n")
    return spec


def _unused_view(images_dir: Path) -> str:
    used = {p.stem for p in images_dir.iterdir()}
    return next(v for v in VIEWS if v not in used)


def _write_audio_only(path: Path, seconds: float = 1.0, rate: int = 44_100) -> None:
    """An mp4 holding one AAC stream (a 440 Hz tone) and no video."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        samples = np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate).astype(np.float32)
        step = stream.codec_context.frame_size or 1024
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_huge_png(path: Path, side: int) -> None:
    """A real, decodable side x side 1-bit black PNG of a few tens of kB, written row-block-wise."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed 1-bit pixels
    deflate = zlib.compressobj(9)
    block = row * 500
    body = b"".join(deflate.compress(block) for _ in range(side // 500))
    body += deflate.compress(row * (side % 500)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    )


def add_bad_inputs(source: Path, cfg: StudioConfig | None = None) -> dict[str, str]:
    """Add bad products and files to `source` (appending to products.csv); returns what to expect.

    `cfg` sets the good videos and photos of the bad products (sizes, shot lengths, seed); by
    default one 1280x720 video of two 3.5-4 s shots each, so they pass a 720p filter.
    """
    cfg = cfg or StudioConfig(shots_per_video=(2, 2), shot_seconds=(3.5, 4.0))
    source = Path(source)
    source.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 9000])
    expected: dict[str, str] = {}
    specs: list[ProductSpec] = []

    def product(product_id: str, kind: str, **kwargs) -> Path:
        specs.append(_product(rng, source, product_id, kind, cfg, **kwargs))
        return source / product_id

    # Broken or unusable videos, each next to a good video of the same product.
    folder = product("RING9001", "ring")
    (folder / "videos" / "empty.mp4").write_bytes(b"")
    expected["RING9001/videos/empty.mp4"] = (
        "video_empty: zero-byte video (file rejected, product kept with its good video)"
    )

    folder = product("BRCL9002", "bracelet")
    truncated = folder / "videos" / "truncated.mp4"
    write_showcase_video(rng, specs[-1], cfg, truncated, cfg.width, cfg.height)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    expected["BRCL9002/videos/truncated.mp4"] = (
        "video_unreadable: a real mp4 cut to half its bytes, its index (moov) lost (file rejected, product kept)"
    )

    folder = product("BOTL9003", "bottle")
    (folder / "videos" / "notes.mp4").write_text("This is not a video, just text with an .mp4 name.\n")
    expected["BOTL9003/videos/notes.mp4"] = "video_unreadable: a text file named .mp4 (file rejected, product kept)"

    folder = product("BOX9004", "box")
    _write_audio_only(folder / "videos" / "soundtrack.mp4")
    expected["BOX9004/videos/soundtrack.mp4"] = (
        "video_no_stream: audio-only mp4 (AAC, no video stream) (file rejected, product kept)"
    )

    folder = product("SHOE9005", "shoe")
    small_w, small_h = SMALL_VIDEO
    write_showcase_video(rng, specs[-1], cfg, folder / "videos" / "small_640x360.mp4", small_w, small_h)
    expected["SHOE9005/videos/small_640x360.mp4"] = (
        f"video_low_resolution: {small_w}x{small_h}, under 720 px on the short side (file rejected, product kept)"
    )

    # Photos: broken ones next to 3 good photos; unusual-but-valid ones as one of exactly 3.
    folder = product("WTCH9006", "watch")
    (folder / "images" / "extra.jpg").write_text("not an image\n")
    expected["WTCH9006/images/extra.jpg"] = (
        "image_unreadable: a text file named .jpg (file rejected, product kept with 3 photos)"
    )

    def odd_photo_product(product_id: str, kind: str) -> tuple[Path, str, np.ndarray, np.ndarray]:
        folder = product(product_id, kind, images=2)
        view = _unused_view(folder / "images")
        rgb, alpha = render_photo(rng, specs[-1], view, cfg.image_size)
        return folder, view, rgb, alpha

    folder, view, rgb, _ = odd_photo_product("MUG9007", "mug")
    Image.fromarray(rgb).convert("CMYK").save(folder / "images" / f"{view}.jpg", format="JPEG", quality=92)
    expected[f"MUG9007/images/{view}.jpg"] = (
        "kept: a valid CMYK JPEG, converted to RGB and used (the product needs it for its 3 photos)"
    )

    folder, view, rgb, _ = odd_photo_product("RING9008", "ring")
    cv2.imwrite(str(folder / "images" / f"{view}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    expected[f"RING9008/images/{view}.png"] = (
        "kept: a valid 16-bit RGB PNG, converted to 8 bits and used (needed for 3 photos)"
    )

    folder, view, rgb, alpha = odd_photo_product("BRCL9009", "bracelet")
    rgba = np.dstack([rgb, np.round(alpha * 255).astype(np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "images" / f"{view}.png", format="PNG")
    expected[f"BRCL9009/images/{view}.png"] = (
        "kept: a valid RGBA PNG cut-out with a transparent background, converted and used (needed for 3 photos)"
    )

    folder = product("BOTL9010", "bottle")
    _write_huge_png(folder / "images" / "huge.png", HUGE_IMAGE_SIDE)
    expected["BOTL9010/images/huge.png"] = (
        f"image_too_large: a PNG of {HUGE_IMAGE_SIDE}x{HUGE_IMAGE_SIDE} (> 64 MP) "
        "(file rejected, product kept with 3 photos)"
    )

    # Whole products that must be rejected.
    product("BOX9011", "box", videos=0)
    expected["BOX9011"] = "no_videos: the product has photos but no video (product rejected)"

    product("SHOE9012", "shoe", images=2)
    expected["SHOE9012"] = "too_few_images: only 2 photos, 3-5 needed (product rejected)"

    odd_unicode = "RING\u00e99013"
    product(odd_unicode, "ring")
    expected[odd_unicode] = "product_id_invalid: id with non-ASCII characters (product rejected)"

    product("a..b", "box")
    expected["a..b"] = "product_id_invalid: id containing '..' (product rejected)"

    product("WTCH9015", "watch")
    product("wtch9015", "watch")
    for pid in ("WTCH9015", "wtch9015"):
        expected[pid] = (
            "product_id_duplicate: 'WTCH9015' and 'wtch9015' differ only by case "
            "(both rejected: they collide on case-insensitive stores)"
        )

    product("MUG9016", "mug")
    rows = [{"product_id": s.product_id, **s.meta()} for s in specs]
    rows.append(rows[-1])  # MUG9016 listed twice
    expected["products.csv:MUG9016"] = (
        "index_duplicate_kept: products.csv lists MUG9016 twice with identical rows "
        "(the same metadata twice: product kept once)"
    )

    _append_rows(source / "products.csv", rows)
    return expected


def _append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["product_id", "category", "caption", "prompt"])
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Add products and files a robust ingest must reject to a SOURCE tree.")
    parser.add_argument("--source", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(add_bad_inputs(args.source), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
