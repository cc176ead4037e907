"""Evaluation metrics for generated product videos, and the pretrained networks some of them need.

Conventions: a video is a float array in [0, 1] of shape (T, H, W, 3) (RGB); a mask is a bool array
(T, H, W), True on the product region; product photos are (H, W, 3) RGB arrays (uint8, or float in
[0, 1]).

Definitions (the PoC report quotes the short form):

- PSNR, per video: 10 log10(1 / MSE), the MSE taken over every pixel and channel of every frame;
  a split's PSNR is the mean of its videos' PSNRs. Mask region: the MSE over the pixels inside
  the mask only, the SAME pixels taken from both videos. (VideoPainter's "masked" PSNR blanks only
  one side, which mostly measures the blanked area; we do not copy that.)
- SSIM: the standard Gaussian-window SSIM (Wang et al. 2004: 11 taps, sigma 1.5, K1 0.01,
  K2 0.03, data range 1), computed on the full frame per channel and averaged over channels into
  one SSIM map per frame. Whole frame: the mean of the map without the 5-pixel border the window
  cannot cover (what scikit-image and the reference MATLAB code report), averaged over frames.
  Mask region: the mean of the same maps over all mask pixels of all frames (border included, a
  product may touch the edge).
- LPIPS (only where the `lpips` package and its backbone weights load): the spatial LPIPS map,
  averaged over the frame or over the mask pixels, then over frames.
- CLIP-I / DINO: cosine similarity between the embedding of the generated product region (a
  square crop around the mask's bounding box, in `num_crop_frames` frames spread over the clip)
  and the embeddings of the input product photos, averaged over all (frame, photo) pairs.
- FVD (a variant): the Frechet distance between Gaussians fitted to per-clip video features of the
  generated and the real clips. The features are mean-pooled VideoMAE tokens, not I3D logits, so
  the numbers are not comparable to published FVD (or to the seed's "< 300" target).
- Warping error (temporal consistency, after Lai et al. 2018): Farneback optical flow between
  consecutive frames of the reference clip; frame t+1 is warped back to t along the flow and
  compared with frame t by mean absolute error over the pixels whose flow passes the
  forward-backward consistency check (i.e. not occluded, Sundaram et al. 2010), inside the mask
  when one is given; averaged over frame pairs. The same flow (the real clip's) is used for the
  generated and the real clip, so their ratio says how much flicker generation adds.

Networks: a metric whose network is not configured, cannot load, or loads with weights missing
from its checkpoint returns {"unavailable": reason}; it never emits a number from random weights.
Folders written by tests with random weights carry a marker file (`mark_untrained_test_weights`);
they load only with `allow_untrained_test_weights=True`, and every value computed from them carries
the note "computed with untrained test weights", which the PoC report never counts as a result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import correlate1d

# Metric names shared by evaluate_clip, aggregate, the PoC report and the registry tags.
PSNR, PSNR_MASK = "psnr", "psnr_mask"
SSIM, SSIM_MASK = "ssim", "ssim_mask"
LPIPS, LPIPS_MASK = "lpips", "lpips_mask"
CLIP_I, DINO, FVD = "clip_i", "dino", "fvd"
WARP_ERROR, WARP_ERROR_REAL = "warp_error", "warp_error_real"
VIDEO_FEATURES = "video_features"  # per-clip FVD features, turned into FVD by `aggregate`

UNTRAINED_MARKER = "UNTRAINED_TEST_WEIGHTS"
UNTRAINED_NOTE = "computed with untrained test weights"


class MetricValue(TypedDict, total=False):
    """Exactly one of `value` / `unavailable`; `note` qualifies a value; `n` counts clips."""

    value: float
    unavailable: str
    note: str
    n: int


def available(value: float, note: str | None = None) -> MetricValue:
    return {"value": float(value), **({"note": note} if note else {})}


def unavailable(reason: str) -> MetricValue:
    return {"unavailable": reason}


def value_of(metric: MetricValue | float | None) -> float | None:
    """The number of a metric, or None when it is unavailable / absent."""
    if metric is None:
        return None
    if isinstance(metric, Mapping):
        return metric.get("value")
    return float(metric)


# --------------------------------------------------------------------------------- PSNR / SSIM


def _check_pair(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None) -> None:
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(f"videos must both be (T, H, W, 3); got {pred.shape} and {target.shape}")
    if mask is not None:
        if mask.shape != pred.shape[:3]:
            raise ValueError(f"mask shape {mask.shape} != video shape {pred.shape[:3]}")
        if not mask.any():
            raise ValueError("the mask is empty: there is no product region to measure")


def psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of one video (data range 1); inside `mask` on both videos when given.

    Identical inputs give +inf, as scikit-image does.
    """
    _check_pair(pred, target, mask)
    diff = pred.astype(np.float64) - target.astype(np.float64)
    if mask is not None:
        diff = diff[mask.astype(bool)]
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


_SSIM_SIGMA, _SSIM_RADIUS = 1.5, 5  # 11 taps, as Wang et al. 2004 and skimage (truncate 3.5)
_SSIM_C1, _SSIM_C2 = 0.01**2, 0.03**2


@functools.cache
def _gaussian_taps() -> np.ndarray:
    offsets = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    return taps / taps.sum()


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the two spatial axes of (H, W, C), half-sample reflection."""
    taps = _gaussian_taps()
    return correlate1d(correlate1d(image, taps, axis=0, mode="reflect"), taps, axis=1, mode="reflect")


def ssim_map(pred_frame: np.ndarray, target_frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) x 2 -> (H, W) SSIM map, averaged over channels (population covariances)."""
    x, y = pred_frame.astype(np.float64), target_frame.astype(np.float64)
    mu_x, mu_y = _blur(x), _blur(y)
    var_x = _blur(x * x) - mu_x * mu_x
    var_y = _blur(y * y) - mu_y * mu_y
    cov_xy = _blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + _SSIM_C1) * (2 * cov_xy + _SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    return (numerator / denominator).mean(axis=-1)


def ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM of one video: whole frame (border cropped) or the mean over mask pixels (module doc)."""
    _check_pair(pred, target, mask)
    if min(pred.shape[1:3]) <= 2 * _SSIM_RADIUS:
        raise ValueError(f"frames of {pred.shape[1:3]} are too small for the 11-pixel SSIM window")
    total, count = 0.0, 0
    for t in range(pred.shape[0]):  # frame by frame: five float64 maps of a 720p video are large
        frame_map = ssim_map(pred[t], target[t])
        if mask is None:
            inner = frame_map[_SSIM_RADIUS:-_SSIM_RADIUS, _SSIM_RADIUS:-_SSIM_RADIUS]
            total, count = total + inner.sum(), count + inner.size
        else:
            inside = frame_map[mask[t].astype(bool)]
            total, count = total + inside.sum(), count + inside.size
    return float(total / count)


# ----------------------------------------------------------------------------- warping error

_OCCLUSION_ALPHA, _OCCLUSION_BETA = 0.01, 0.5  # forward-backward check of Sundaram et al. 2010


@dataclass(frozen=True)
class FramePairFlow:
    """Flow from frame t to t+1 of the reference, and where it is trustworthy."""

    sample_x: np.ndarray  # (H, W) float32: x coordinate in frame t+1 of each pixel of frame t
    sample_y: np.ndarray
    visible: np.ndarray  # (H, W) bool: inside frame t+1 and passes the consistency check


def _gray_uint8(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(_to_uint8(frame), cv2.COLOR_RGB2GRAY)


def _farneback(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return cv2.calcOpticalFlowFarneback(
        first, second, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
    )


def optical_flows(reference: np.ndarray) -> list[FramePairFlow]:
    """Farneback flow for every consecutive frame pair of a (T, H, W, 3) video, with occlusions."""
    if reference.ndim != 4 or reference.shape[0] < 2:
        raise ValueError(f"temporal consistency needs a (T>=2, H, W, 3) video, got {reference.shape}")
    height, width = reference.shape[1:3]
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    grays = [_gray_uint8(frame) for frame in reference]
    pairs = []
    for current, following in zip(grays[:-1], grays[1:]):
        forward = _farneback(current, following)
        backward = _farneback(following, current)
        sample_x, sample_y = grid_x + forward[..., 0], grid_y + forward[..., 1]
        backward_there = cv2.remap(backward, sample_x, sample_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        round_trip = np.sum((forward + backward_there) ** 2, axis=-1)
        magnitude = np.sum(forward**2, axis=-1) + np.sum(backward_there**2, axis=-1)
        consistent = round_trip < _OCCLUSION_ALPHA * magnitude + _OCCLUSION_BETA
        inside = (sample_x >= 0) & (sample_x <= width - 1) & (sample_y >= 0) & (sample_y <= height - 1)
        pairs.append(FramePairFlow(sample_x, sample_y, consistent & inside))
    return pairs


def warping_error(
    video: np.ndarray,
    flow_source: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    flows: list[FramePairFlow] | None = None,
) -> float:
    """Mean |frame_t - warp(frame_t+1)| over visible pixels (inside `mask[t]` if given).

    The flow comes from `flows` (precomputed with `optical_flows`), else from `flow_source` (the
    real clip, when scoring a generated one), else from `video` itself. Pairs without a visible
    pixel are skipped; raises ValueError when no pair has one.
    """
    if flows is None:
        flows = optical_flows(video if flow_source is None else flow_source)
    if len(flows) != video.shape[0] - 1:
        raise ValueError(f"{len(flows)} flows for a video of {video.shape[0]} frames")
    errors = []
    for t, pair in enumerate(flows):
        visible = pair.visible if mask is None else pair.visible & mask[t].astype(bool)
        if not visible.any():
            continue
        warped = cv2.remap(
            video[t + 1].astype(np.float32),
            pair.sample_x,
            pair.sample_y,
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        errors.append(float(np.abs(video[t].astype(np.float32) - warped)[visible].mean()))
    if not errors:
        raise ValueError("no pixel (in the mask) stays visible between consecutive frames")
    return float(np.mean(errors))


# ------------------------------------------------------------------------- Frechet distance


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the Frechet distance of two Gaussians.

    Tr((S1 S2)^1/2) is computed as Tr((S1^1/2 S2 S1^1/2)^1/2) (same eigenvalues) with symmetric
    eigendecompositions: exact for the singular covariances of fewer clips than feature
    dimensions, where scipy's sqrtm of the non-symmetric S1 S2 warns and loses accuracy.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shapes do not match: {mu1.shape} {sigma1.shape} {mu2.shape} {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (N >= 2 each)."""
    features1, features2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if min(len(features1), len(features2)) < 2:
        raise ValueError("a Frechet distance needs at least 2 samples on each side")
    return frechet_distance(
        features1.mean(0), np.cov(features1, rowvar=False), features2.mean(0), np.cov(features2, rowvar=False)
    )


# ------------------------------------------------------------------------ metric networks


class MetricNetworks(BaseModel):
    """Where the metric networks come from: a local folder or a hub id each; None = not configured.

    clip: a transformers CLIPModel checkpoint with its image processor (e.g.
    openai/clip-vit-large-patch14). dino: a Dinov2Model checkpoint (facebook/dinov2-base).
    fvd: a VideoMAEModel checkpoint (MCG-NJU/videomae-base-finetuned-kinetics), used for the FVD
    variant. lpips_net: "alex" or "vgg", through the `lpips` package (needs torchvision and its
    backbone weights in TORCH_HOME; neither exists on the CPU test box).
    """

    model_config = ConfigDict(extra="forbid")

    clip: str | None = None
    dino: str | None = None
    fvd: str | None = None
    lpips_net: Literal["alex", "vgg"] | None = None
    local_files_only: bool = False  # True = never contact the hub, only local folders / HF cache
    device: str = "cpu"
    num_crop_frames: int = Field(4, ge=1)
    # Test-only: accept folders marked by `mark_untrained_test_weights`; values get a note.
    allow_untrained_test_weights: bool = False


class NetworkUnavailable(RuntimeError):
    """A metric network cannot be used; the message is the reason shown in reports."""


@dataclass(frozen=True)
class LoadedNetwork:
    model: Any
    processor: Any
    note: str | None  # UNTRAINED_NOTE for marked test weights


def mark_untrained_test_weights(folder: str | Path) -> None:
    """Mark a folder of randomly initialised weights (tests) so reports can never mistake it."""
    (Path(folder) / UNTRAINED_MARKER).write_text(
        "These weights are randomly initialised for tests; metrics computed with them mean nothing.\n"
    )


def _network_classes(kind: str):
    from transformers import AutoImageProcessor, CLIPModel, Dinov2Model, VideoMAEModel

    return {"clip": CLIPModel, "dino": Dinov2Model, "fvd": VideoMAEModel}[kind], AutoImageProcessor


def _remember_failures(load):
    """functools.cache for a network loader, failures included: an offline hub lookup retries for
    half a minute, which must not happen again for every clip."""

    @functools.cache
    def outcome(*key):
        try:
            return load(*key)
        except NetworkUnavailable as error:
            return str(error)

    @functools.wraps(load)
    def cached(*key):
        result = outcome(*key)
        if isinstance(result, str):
            raise NetworkUnavailable(result)
        return result

    return cached


@_remember_failures
def _load_network(kind: str, source: str, local_files_only: bool, device: str, allow_untrained: bool) -> LoadedNetwork:
    untrained = (Path(source) / UNTRAINED_MARKER).exists()
    if untrained and not allow_untrained:
        raise NetworkUnavailable(f"{kind} weights at {source} are marked as untrained test weights")
    model_class, processor_class = _network_classes(kind)
    try:
        model, info = model_class.from_pretrained(source, local_files_only=local_files_only, output_loading_info=True)
        processor = processor_class.from_pretrained(source, local_files_only=local_files_only)
    except Exception as error:  # any loading failure makes the metric unavailable
        raise NetworkUnavailable(
            f"{kind} network {source!r} did not load: {type(error).__name__}: {str(error)[:300]}"
        ) from error
    # from_pretrained silently initialises weights its checkpoint lacks: refuse those.
    missing = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
    if missing:
        raise NetworkUnavailable(
            f"{kind} checkpoint {source!r} lacks {len(missing)} weights of a "
            f"{model_class.__name__} (e.g. {missing[0]}): wrong checkpoint type?"
        )
    return LoadedNetwork(model.to(device).eval(), processor, UNTRAINED_NOTE if untrained else None)


def load_network(kind: Literal["clip", "dino", "fvd"], networks: MetricNetworks) -> LoadedNetwork:
    """The loaded network, or NetworkUnavailable with the reason."""
    source = getattr(networks, kind)
    if not source:
        raise NetworkUnavailable(f"no {kind} network configured (MetricNetworks.{kind})")
    return _load_network(
        kind, str(source), networks.local_files_only, networks.device, networks.allow_untrained_test_weights
    )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def product_crops(video: np.ndarray, masks: np.ndarray, num_frames: int = 4) -> list[np.ndarray]:
    """Square uint8 crops around the mask's bounding box in up to `num_frames` spread frames."""
    frames_with_product = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    if len(frames_with_product) == 0:
        raise ValueError("the mask is empty in every frame: no product region to crop")
    picks = frames_with_product[
        np.linspace(0, len(frames_with_product) - 1, min(num_frames, len(frames_with_product))).round().astype(int)
    ]
    height, width = masks.shape[1:]
    crops = []
    for t in picks:
        ys, xs = np.nonzero(masks[t])
        # A square box keeps the processor's resize + centre crop from cutting the product off.
        side = min(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1, height, width)
        top = int(np.clip((ys.min() + ys.max() + 1 - side) // 2, 0, height - side))
        left = int(np.clip((xs.min() + xs.max() + 1 - side) // 2, 0, width - side))
        crops.append(_to_uint8(video[t, top : top + side, left : left + side]))
    return crops


@torch.no_grad()
def _image_embeddings(kind: str, network: LoadedNetwork, images: Sequence[np.ndarray], device: str) -> torch.Tensor:
    pixels = network.processor(images=[_to_uint8(image) for image in images], return_tensors="pt").pixel_values.to(
        device
    )
    if kind == "clip":
        embeddings = network.model.get_image_features(pixel_values=pixels).pooler_output
    else:  # DINO score: the CLS token after the final layer norm, as DreamBooth's metric
        embeddings = network.model(pixel_values=pixels).pooler_output
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def _identity_similarity(
    kind: Literal["clip", "dino"],
    generated: np.ndarray,
    masks: np.ndarray,
    photos: Sequence[np.ndarray],
    networks: MetricNetworks,
) -> MetricValue:
    if len(photos) == 0:
        return unavailable("no product photos given")
    try:
        network = load_network(kind, networks)
    except NetworkUnavailable as error:
        return unavailable(str(error))
    crops = product_crops(generated, masks, networks.num_crop_frames)
    similarity = (
        _image_embeddings(kind, network, crops, networks.device)
        @ _image_embeddings(kind, network, photos, networks.device).T
    )
    return available(similarity.mean().item(), network.note)


def clip_i(
    generated: np.ndarray, masks: np.ndarray, photos: Sequence[np.ndarray], networks: MetricNetworks
) -> MetricValue:
    """Mean CLIP image-embedding cosine between product crops of `generated` and the photos."""
    return _identity_similarity("clip", generated, masks, photos, networks)


def dino_score(
    generated: np.ndarray, masks: np.ndarray, photos: Sequence[np.ndarray], networks: MetricNetworks
) -> MetricValue:
    """Mean DINOv2 CLS cosine between product crops of `generated` and the photos."""
    return _identity_similarity("dino", generated, masks, photos, networks)


@torch.no_grad()
def video_features(video: np.ndarray, networks: MetricNetworks) -> np.ndarray:
    """Mean-pooled VideoMAE tokens of `num_frames` evenly spaced frames (FVD variant features).

    Raises NetworkUnavailable when the network cannot be used.
    """
    network = load_network("fvd", networks)
    count = network.model.config.num_frames
    indices = np.linspace(0, len(video) - 1, count).round().astype(int)
    pixels = network.processor([_to_uint8(frame) for frame in video[indices]], return_tensors="pt").pixel_values.to(
        networks.device
    )
    return network.model(pixel_values=pixels).last_hidden_state.mean(dim=1)[0].float().cpu().numpy()


def fvd_from_features(
    generated: Sequence[Sequence[float]], real: Sequence[Sequence[float]], note: str | None = None
) -> MetricValue:
    if min(len(generated), len(real)) < 2:
        return unavailable(f"FVD needs at least 2 clips per side, got {len(generated)}")
    return {**available(fid_from_features(np.asarray(generated), np.asarray(real)), note), "n": len(generated)}


@_remember_failures
def _lpips_model(net: str, device: str):
    try:
        import lpips as lpips_package  # imports torchvision; absent on the CPU box
    except ImportError as error:
        raise NetworkUnavailable(f"lpips needs the lpips package and torchvision ({error})") from error
    try:
        return lpips_package.LPIPS(net=net, spatial=True, verbose=False).to(device).eval()
    except Exception as error:  # e.g. backbone weights not downloadable offline
        raise NetworkUnavailable(
            f"lpips {net} weights did not load: {type(error).__name__}: {str(error)[:300]}"
        ) from error


@torch.no_grad()
def lpips(
    pred: np.ndarray, target: np.ndarray, masks: np.ndarray, networks: MetricNetworks
) -> tuple[MetricValue, MetricValue]:
    """(whole frame, mask region) LPIPS of one video: the spatial map's mean, frame by frame."""
    if networks.lpips_net is None:
        reason = unavailable("no LPIPS network configured (MetricNetworks.lpips_net)")
        return reason, reason
    try:
        model = _lpips_model(networks.lpips_net, networks.device)
    except NetworkUnavailable as error:
        return unavailable(str(error)), unavailable(str(error))

    def to_input(video: np.ndarray) -> torch.Tensor:  # LPIPS reads NCHW in [-1, 1]
        return torch.from_numpy(np.ascontiguousarray(video, np.float32)).permute(0, 3, 1, 2) * 2 - 1

    distance_map = torch.cat(
        [
            model(to_input(pred[t : t + 1]).to(networks.device), to_input(target[t : t + 1]).to(networks.device)).cpu()
            for t in range(len(pred))
        ]
    )[:, 0].numpy()
    return available(distance_map.mean()), available(distance_map[masks.astype(bool)].mean())


# --------------------------------------------------------------------------- per clip, per split


def evaluate_clip(
    generated: np.ndarray,
    real: np.ndarray,
    masks: np.ndarray,
    photos: Sequence[np.ndarray] = (),
    networks: MetricNetworks | None = None,
) -> dict:
    """Every metric of one clip: {name: MetricValue}, plus VIDEO_FEATURES for `aggregate`'s FVD.

    The warping errors are measured in the product region with the real clip's flow, for the
    generated clip (WARP_ERROR) and the real one (WARP_ERROR_REAL): outside the mask a composited
    output equals the input, which would dilute any flicker.
    """
    networks = networks or MetricNetworks()
    masks = masks.astype(bool)
    row: dict[str, Any] = {
        PSNR: available(psnr(generated, real)),
        PSNR_MASK: available(psnr(generated, real, masks)),
        SSIM: available(ssim(generated, real)),
        SSIM_MASK: available(ssim(generated, real, masks)),
    }
    row[LPIPS], row[LPIPS_MASK] = lpips(generated, real, masks, networks)
    row[CLIP_I] = clip_i(generated, masks, photos, networks)
    row[DINO] = dino_score(generated, masks, photos, networks)
    flows = optical_flows(real)
    for name, video in ((WARP_ERROR, generated), (WARP_ERROR_REAL, real)):
        try:
            row[name] = available(warping_error(video, mask=masks, flows=flows))
        except ValueError as error:
            row[name] = unavailable(str(error))
    try:
        note = load_network("fvd", networks).note
        row[VIDEO_FEATURES] = {
            "generated": video_features(generated, networks).tolist(),
            "real": video_features(real, networks).tolist(),
            **({"note": note} if note else {}),
        }
    except NetworkUnavailable as error:
        row[VIDEO_FEATURES] = unavailable(str(error))
    return row


def _is_metric(value: Any) -> bool:
    return isinstance(value, Mapping) and ("value" in value or "unavailable" in value)


def _mean_metric(values: list[MetricValue]) -> MetricValue:
    numbers = [v["value"] for v in values if "value" in v]
    if not numbers:
        reasons = sorted({v["unavailable"] for v in values})
        return unavailable("; ".join(reasons))
    result: MetricValue = {"value": float(np.mean(numbers)), "n": len(numbers)}
    notes = sorted({v["note"] for v in values if "note" in v})
    missing = len(values) - len(numbers)
    if missing:
        notes.append(f"{missing} of {len(values)} clips unavailable")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def _summarise(rows: list[dict]) -> dict[str, MetricValue]:
    names = sorted(
        {name for row in rows for name, value in row.items() if name != VIDEO_FEATURES and _is_metric(value)}
    )
    summary = {name: _mean_metric([row[name] for row in rows if _is_metric(row.get(name))]) for name in names}
    features = [row.get(VIDEO_FEATURES) for row in rows]
    usable = [f for f in features if isinstance(f, Mapping) and "generated" in f]
    if usable:
        notes = {f["note"] for f in usable if "note" in f}
        summary[FVD] = fvd_from_features(
            [f["generated"] for f in usable], [f["real"] for f in usable], "; ".join(sorted(notes)) or None
        )
    elif any(isinstance(f, Mapping) for f in features):
        summary[FVD] = _mean_metric([f for f in features if _is_metric(f)])
    return summary


def aggregate(rows: Sequence[Mapping], by: str = "category") -> dict:
    """Per-clip rows (evaluate_clip + a `by` column) -> {"overall": {...}, "by_<by>": {group: {...}}}.

    Each metric is the mean over the clips where it is available (`n` clips); FVD is computed per
    group from the clips' VIDEO_FEATURES.
    """
    rows = [dict(row) for row in rows]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row[by]), []).append(row)
    return {
        "overall": _summarise(rows),
        f"by_{by}": {group: _summarise(members) for group, members in sorted(groups.items())},
    }
