"""Metric functions against independent implementations and closed forms; network metrics never
produce a number without trained weights."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models import metrics as m


def _videos(seed=0, frames=3, height=32, width=40):
    rng = np.random.default_rng(seed)
    target = rng.random((frames, height, width, 3))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    masks = np.zeros((frames, height, width), bool)
    masks[:, 8:20, 10:30] = True
    return pred, target, masks


def _skimage_ssim(pred_frame, target_frame, full=False):
    return structural_similarity(
        pred_frame,
        target_frame,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
        full=full,
    )


def test_psnr_matches_skimage_on_whole_video_and_on_mask_pixels_of_both_sides():
    pred, target, masks = _videos()
    assert m.psnr(pred, target) == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=1.0))
    assert m.psnr(pred, target, masks) == pytest.approx(
        peak_signal_noise_ratio(target[masks], pred[masks], data_range=1.0)
    )
    # Differences outside the mask do not count in the mask region (both sides compared there).
    spoiled = pred.copy()
    spoiled[~masks] = 1 - spoiled[~masks]
    assert m.psnr(spoiled, target, masks) == pytest.approx(m.psnr(pred, target, masks))
    assert m.psnr(spoiled, target) < m.psnr(pred, target) - 5
    assert m.psnr(target, target) == float("inf")


def test_ssim_matches_skimage_whole_frame_and_its_map_inside_the_mask():
    pred, target, masks = _videos(seed=1)
    assert m.ssim(pred, target) == pytest.approx(
        np.mean([_skimage_ssim(p, t) for p, t in zip(pred, target)]), abs=1e-10
    )
    maps = np.stack([_skimage_ssim(p, t, full=True)[1].mean(axis=-1) for p, t in zip(pred, target)])
    assert m.ssim(pred, target, masks) == pytest.approx(maps[masks].mean(), abs=1e-10)
    assert m.ssim(target, target) == pytest.approx(1.0)


def test_psnr_and_ssim_refuse_an_empty_mask_and_mismatched_shapes():
    pred, target, masks = _videos()
    with pytest.raises(ValueError, match="empty"):
        m.psnr(pred, target, np.zeros_like(masks))
    with pytest.raises(ValueError, match="must both be"):
        m.ssim(pred, target[:2])


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(2)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Isotropic: sigma = s^2 I -> ||mu1 - mu2||^2 + d (s1 - s2)^2
    s1, s2 = 0.7, 1.9
    assert m.frechet_distance(mu1, s1**2 * np.eye(d), mu2, s2**2 * np.eye(d)) == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + d * (s1 - s2) ** 2
    )
    # Diagonal: sum of (sqrt(a_i) - sqrt(b_i))^2
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    assert m.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    )
    # General, well conditioned: the textbook formula with scipy's sqrtm of S1 S2.
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert m.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert m.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-7)
    # Singular (rank 1 each, as with fewer clips than feature dimensions): still the closed form.
    u = np.eye(d)[0]
    assert m.frechet_distance(mu1, 4 * np.outer(u, u), mu1, np.outer(u, u)) == pytest.approx(1.0)


def test_fid_from_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 40000
    first = rng.normal(0.0, 1.0, (n, d))
    second = rng.normal(0.5, 2.0, (n, d))
    closed = d * 0.5**2 + d * (1.0 - 2.0) ** 2
    assert m.fid_from_features(first, second) == pytest.approx(closed, rel=0.03)
    with pytest.raises(ValueError, match="at least 2"):
        m.fid_from_features(first[:1], second)


def _moving_texture(frames=5, shift=2, size=64):
    """A smooth random texture sliding right by `shift` pixels per frame."""
    rng = np.random.default_rng(4)
    base = rng.random((size // 4, (size + frames * shift) // 4 + 1, 3))
    import cv2

    big = cv2.resize(base.astype(np.float32), (base.shape[1] * 4, size), interpolation=cv2.INTER_CUBIC)
    big = np.clip(big, 0, 1)
    return np.stack([big[:, (frames - t) * shift : (frames - t) * shift + size] for t in range(frames)])


def test_warping_error_is_small_for_consistent_motion_and_large_for_flicker():
    real = _moving_texture()
    masks = np.zeros(real.shape[:3], bool)
    masks[:, 16:48, 16:48] = True
    assert m.warping_error(np.repeat(real[:1], 4, axis=0)) == pytest.approx(0, abs=1e-3)
    consistent = m.warping_error(real, mask=masks)
    flicker = real * np.array([1.0, 0.7, 1.0, 0.7, 1.0])[:, None, None, None]
    flickering = m.warping_error(flicker, flow_source=real, mask=masks)
    assert consistent < 0.02
    assert flickering > 5 * consistent
    with pytest.raises(ValueError, match="T>=2"):
        m.optical_flows(real[:1])


def test_with_no_weights_configured_every_network_metric_is_unavailable():
    pred, target, masks = _videos()
    row = m.evaluate_clip(pred, target, masks, photos=[target[0]])
    for name in (m.LPIPS, m.LPIPS_MASK, m.CLIP_I, m.DINO):
        assert "value" not in row[name] and "configured" in row[name]["unavailable"], name
    assert "unavailable" in row[m.VIDEO_FEATURES]
    for name in (m.PSNR, m.PSNR_MASK, m.SSIM, m.SSIM_MASK, m.WARP_ERROR, m.WARP_ERROR_REAL):
        assert np.isfinite(row[name]["value"]), name
    summary = m.aggregate([{**row, "category": "ring"}], by="category")
    assert "unavailable" in summary["overall"][m.FVD] and "unavailable" in summary["overall"][m.CLIP_I]


def test_a_configured_network_that_does_not_load_says_why(tmp_path):
    pred, _, masks = _videos()
    networks = m.MetricNetworks(
        clip=str(tmp_path / "missing"), dino=str(tmp_path / "missing"), local_files_only=True, lpips_net="alex"
    )
    assert "did not load" in m.clip_i(pred, masks, [pred[0]], networks)["unavailable"]
    assert "did not load" in m.dino_score(pred, masks, [pred[0]], networks)["unavailable"]
    whole, inside = m.lpips(pred, pred, masks, networks)
    assert "lpips" in whole["unavailable"] and "value" not in inside


@pytest.fixture(scope="module")
def tiny_networks(tmp_path_factory):
    """Random tiny CLIP / VideoMAE saved like real checkpoints, marked as untrained test weights."""
    import transformers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        VideoMAEConfig,
        VideoMAEImageProcessor,
        VideoMAEModel,
    )

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("networks")
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(
        CLIPConfig(
            text_config={**tower, "vocab_size": 64},
            vision_config={**tower, "image_size": 32, "patch_size": 8},
            projection_dim=8,
        )
    ).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    VideoMAEModel(VideoMAEConfig(**tower, image_size=32, patch_size=8, num_frames=4, tubelet_size=2)).save_pretrained(
        root / "videomae"
    )
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "videomae"
    )
    for folder in ("clip", "videomae"):
        m.mark_untrained_test_weights(root / folder)
    return root


def test_untrained_test_weights_load_only_when_allowed_and_values_say_so(tiny_networks):
    pred, _, masks = _videos(frames=4, height=48, width=48)
    photo = pred[0, 8:20, 14:26]  # the square crop around the mask's bounding box in frame 0
    masks[:] = False
    masks[:, 8:20, 14:26] = True
    strict = m.MetricNetworks(clip=str(tiny_networks / "clip"), local_files_only=True)
    assert "untrained" in m.clip_i(pred, masks, [photo], strict)["unavailable"]

    allowed = strict.model_copy(update={"allow_untrained_test_weights": True, "num_crop_frames": 1})
    result = m.clip_i(pred, masks, [photo], allowed)
    assert result["value"] == pytest.approx(1.0, abs=1e-5) and result["note"] == m.UNTRAINED_NOTE
    assert m.clip_i(pred, masks, [1 - photo], allowed)["value"] < 0.999


def test_a_checkpoint_of_the_wrong_type_is_refused_not_randomly_completed(tiny_networks):
    pred, _, masks = _videos()
    networks = m.MetricNetworks(
        dino=str(tiny_networks / "clip"), local_files_only=True, allow_untrained_test_weights=True
    )
    assert "lacks" in m.dino_score(pred, masks, [pred[0]], networks)["unavailable"]


def test_aggregate_means_per_category_and_fvd_from_clip_features(tiny_networks):
    networks = m.MetricNetworks(
        fvd=str(tiny_networks / "videomae"), local_files_only=True, allow_untrained_test_weights=True
    )
    rows = []
    for seed, category in enumerate(["ring", "ring", "watch", "watch"]):
        pred, target, masks = _videos(seed=seed, frames=4)
        rows.append({**m.evaluate_clip(pred, target, masks, networks=networks), "category": category})
    summary = m.aggregate(rows, by="category")
    ring = summary["by_category"]["ring"]
    assert ring[m.PSNR]["value"] == pytest.approx(np.mean([r[m.PSNR]["value"] for r in rows[:2]]))
    assert ring[m.PSNR]["n"] == 2 and summary["overall"][m.PSNR]["n"] == 4
    fvd = summary["overall"][m.FVD]
    assert fvd["n"] == 4 and fvd["value"] >= 0 and fvd["note"] == m.UNTRAINED_NOTE
    same = [
        {**r, m.VIDEO_FEATURES: {"generated": r[m.VIDEO_FEATURES]["real"], "real": r[m.VIDEO_FEATURES]["real"]}}
        for r in rows
    ]
    assert m.aggregate(same)["overall"][m.FVD]["value"] == pytest.approx(0, abs=1e-6)
    assert "unavailable" in summary["overall"][m.CLIP_I]
