"""Image I/O: decoding untrusted photos safely and writing PNGs."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, ImageOps

from storage.rejects import RejectError

# Above this, a photo is a decompression bomb as far as this pipeline cares (~ 8k x 8k).
MAX_PIXELS = 64_000_000


class ImageError(RejectError):
    """A file that cannot serve as a product photo; the message is the reject reason."""


def load_photo(uri: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a photo as 8-bit RGB (H x W x 3) and its alpha (H x W, or None).

    EXIF orientation is applied; CMYK, palette, greyscale and 16-bit photos are converted, since
    they are valid photos; what cannot be decoded, or is larger than `max_pixels`, raises.
    """
    with fsspec.open(str(uri), "rb") as f:
        data = f.read()
    if not data:
        raise ImageError("image_empty", "file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe_img:
                w, h = probe_img.size
                if w * h > max_pixels:
                    raise ImageError(
                        "image_too_large",
                        f"{w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit "
                        "(decompression-bomb guard)",
                    )
                probe_img.verify()
            img = Image.open(io.BytesIO(data))
            img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("image_too_large", f"decompression bomb: {exc}") from exc
        except Exception as exc:  # PIL raises many types for broken files
            raise ImageError("image_unreadable", f"not a readable image: {exc}") from exc
    img = ImageOps.exif_transpose(img)
    return _to_rgb8(img)


def load_photo_rgba(uri: str | Path) -> np.ndarray:
    """A photo as H x W x 4 uint8 (load_photo's RGB and alpha; no alpha means opaque)."""
    rgb, alpha = load_photo(uri)
    alpha = np.full(rgb.shape[:2], 255, np.uint8) if alpha is None else alpha
    return np.concatenate([rgb, alpha[..., None]], axis=2)


def _to_rgb8(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    alpha = None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), None
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(img.convert("RGBA"))
        alpha = rgba[..., 3].copy()
        if alpha.min() == 255:
            alpha = None
        return np.ascontiguousarray(rgba[..., :3]), alpha
    if img.mode == "CMYK":
        img = img.convert("RGB")
    return np.asarray(img.convert("RGB")).copy(), None


def save_png(path: Path, arr: np.ndarray, compress_level: int = 1) -> None:
    """Write an array as PNG (mode from its shape); low compression: masks are written per frame."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=compress_level)


def load_mask_png(path: Path) -> np.ndarray:
    """A mask PNG as a boolean H x W array."""
    return np.asarray(Image.open(path).convert("L")) > 127
