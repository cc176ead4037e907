"""Background removal for product photos: RGB photo -> soft alpha matte (H x W float32, 0..1).

Two backends:
- `rembg`: a salient-object network run through rembg/onnxruntime (u2net and friends). One
  session per model and process (loading takes seconds; a photo takes a fraction of that).
- `classic`: no weights, for studio photos on a plain backdrop: the backdrop colour is read from the
  photo's border, pixels far from it (in Lab) are the product; morphology removes specks and
  bridges gaps, small detached blobs are dropped, holes are filled (a white label on a white
  backdrop stays product) and the edge is feathered. It cannot separate a product from a backdrop of
  the same colour, nor from a cluttered scene: use rembg there.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from storage.errors import SystemicError

Backend = Literal["rembg", "classic"]

# The classic backend works at this longer side at most: the matte is smooth, so computing it on
# a 60 MP photo costs memory and time for nothing; it is resized back to the photo's size.
CLASSIC_WORK_SIDE = 1024
# Blobs smaller than this fraction of the largest one are dust or shadows, not product parts; a
# pair of shoes or earrings keeps both pieces.
CLASSIC_MIN_PART_FRACTION = 0.2


def remove_background(
    rgb: np.ndarray, backend: Backend, rembg_model: str = "u2net", classic_threshold: float = 20.0
) -> np.ndarray:
    """Alpha matte (H x W float32 in 0..1, 1 = product) of an 8-bit RGB photo."""
    if backend == "rembg":
        return rembg_alpha(rgb, rembg_model)
    if backend == "classic":
        return classic_alpha(rgb, classic_threshold)
    raise ValueError(f"unknown background-removal backend {backend!r}; use 'rembg' or 'classic'")


# -- rembg ------------------------------------------------------------------------------------


def rembg_alpha(rgb: np.ndarray, model: str) -> np.ndarray:
    session = rembg_session(model)
    mask = session.predict(Image.fromarray(rgb))[0]  # "L" image at the photo's size
    return np.asarray(mask, dtype=np.float32) / 255.0


def is_model_file(model: str) -> bool:
    """A `rembg_model` naming an .onnx file rather than one of rembg's model names."""
    return Path(model).suffix.lower() == ".onnx"


@functools.cache
def rembg_session(model: str):
    """The rembg session for a model name or an .onnx path, created once per process.

    Any failure to load is systemic (every photo would fail the same way), so it raises
    SystemicError saying how to get a model onto the machine.
    """
    # Imported here: rembg pulls in onnxruntime, which the classic backend does not need.
    from rembg import new_session

    how_to_fix = (
        "put the model's .onnx file in a folder and pass its path as rembg_model "
        "(e.g. rembg_model=/models/u2net.onnx), or, for studio photos on a plain backdrop, "
        "use the classic backend (build config: images.backend=classic, as configs/dataset/demo.yaml)"
    )
    if is_model_file(model):
        path = Path(model).expanduser().resolve()
        if not path.is_file():
            raise SystemicError(f"rembg model file {str(path)!r} does not exist: {how_to_fix}")
        try:
            return _local_onnx_session(path)
        except Exception as exc:  # onnxruntime raises its own types for a broken file
            raise SystemicError(f"rembg could not load {str(path)!r} ({exc}): {how_to_fix}") from exc
    try:
        return new_session(model)
    except Exception as exc:  # unknown name (ValueError) or a download that cannot happen here
        raise SystemicError(
            f"rembg model {model!r} could not be loaded ({type(exc).__name__}: {exc}); rembg downloads "
            f"named models on first use, which fails without network access: {how_to_fix}"
        ) from exc


def _local_onnx_session(path: Path):
    """rembg's `u2net_custom` session on an .onnx file anywhere on disk.

    rembg 2.0.86 accepts `u2net_custom`'s model_path only under REMBG_HOME or U2NET_HOME
    (BaseSession.validate_model_path); making users move their file there, or setting those
    variables process-wide from here, is worse than resolving the path ourselves, which is all
    `download_models` does for this session class.
    """
    import onnxruntime as ort
    from rembg.sessions.u2net_custom import U2netCustomSession

    class LocalFileSession(U2netCustomSession):
        @classmethod
        def download_models(cls, *args, **kwargs):
            return str(path)

    return LocalFileSession("u2net_custom", ort.SessionOptions(), model_path=str(path))


# -- classic ----------------------------------------------------------------------------------


def classic_alpha(rgb: np.ndarray, threshold: float = 20.0) -> np.ndarray:
    """Matte of a product on a plain backdrop; `threshold` is the Lab distance (OpenCV's 8-bit Lab,
    L in 0..255) above the backdrop's own variation at which a pixel counts as product."""
    h, w = rgb.shape[:2]
    scale = min(1.0, CLASSIC_WORK_SIDE / max(h, w))
    small_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(rgb, small_size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    foreground = _classic_foreground(small, threshold)
    # Feathering: about one output pixel of soft edge, so cut-outs do not look stencilled.
    matte = cv2.GaussianBlur(foreground.astype(np.float32), (0, 0), sigmaX=1.0)
    if scale < 1:
        matte = cv2.resize(matte, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(matte, 0.0, 1.0)


def _classic_foreground(rgb: np.ndarray, threshold: float) -> np.ndarray:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    h, w = lab.shape[:2]
    band = max(2, round(0.02 * min(h, w)))
    border = np.concatenate([side.reshape(-1, 3) for side in (lab[:band], lab[-band:], lab[:, :band], lab[:, -band:])])
    # Medians: the product may touch the border; as long as it covers less than half of it, the
    # backdrop colour and its spread (vignetting, JPEG noise) are read from the backdrop alone.
    backdrop = np.median(border, axis=0)
    spread = float(np.median(np.linalg.norm(border - backdrop, axis=1)))
    foreground = (np.linalg.norm(lab - backdrop, axis=2) > threshold + 3.0 * spread).astype(np.uint8)

    size = max(3, round(0.01 * min(h, w)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, kernel)  # specks, JPEG noise
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, kernel)  # thin gaps in the product

    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count <= 1:
        return np.zeros((h, w), dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    parts = 1 + np.flatnonzero(areas >= CLASSIC_MIN_PART_FRACTION * areas.max())
    return ndimage.binary_fill_holes(np.isin(labels, parts))
