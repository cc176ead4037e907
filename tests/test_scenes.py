"""Scenes stage on small synthetic videos: cuts, windows, rejects, normalisation, odd sources."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import tasks.dataset.scenes as scenes
from storage.hashing import sha256_file
from storage.schemas import to_table
from storage.video import VideoError, fit_crop, iter_frames, probe, read_video, resample_cfr, write_video
from tasks.dataset.scenes import SceneConfig, find_shots, split_video

FPS = 24
H, W = 96, 128  # source and output size where the test is not about resolution (see test_rerun)
COLOURS = [(200, 40, 40), (40, 190, 60), (50, 60, 210), (220, 210, 50)]


def small_cfg(**overrides) -> SceneConfig:
    return SceneConfig(min_short_side=None, height=H, width=W, fps=FPS, **overrides)


def shot_frames(durations_s: list[float], height: int = H, width: int = W):
    """One flat colour per shot (hard cuts) with a white square sliding across, so frames move."""
    for shot, duration in enumerate(durations_s):
        for i in range(round(duration * FPS)):
            img = np.empty((height, width, 3), np.uint8)
            img[:] = COLOURS[shot % len(COLOURS)]
            x = (2 * i) % (width - 16)
            img[height // 2 - 8 : height // 2 + 8, x : x + 16] = 255
            yield img


def make_video(path: Path, durations_s: list[float], height: int = H, width: int = W) -> Path:
    write_video(path, shot_frames(durations_s, height, width), FPS)
    return path


def source_row(path: Path) -> dict:
    digest, size = sha256_file(path)
    return {
        "product_id": "P001",
        "role": "video",
        "name": path.name,
        "uri": str(path),
        "size_bytes": size,
        "sha256": digest,
    }


def clip_files(root: Path) -> list[Path]:
    return sorted((root / "video_clips").glob("*")) if (root / "video_clips").exists() else []


@pytest.fixture(scope="module")
def three_shots(tmp_path_factory) -> Path:
    """4 s, 2 s (too short), 12 s (long, runs to the end): cuts at frames 96 and 144."""
    return make_video(tmp_path_factory.mktemp("src") / "three.mp4", [4, 2, 12])


@pytest.fixture(scope="module")
def three_shots_result(three_shots, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    return root, split_video(source_row(three_shots), str(root), small_cfg())


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_cuts_are_found_on_the_right_frame(three_shots, detector):
    cfg = small_cfg(detector=detector)
    shots = find_shots(resample_cfr(iter_frames(three_shots), FPS), cfg)
    assert len(shots) == 3
    truth = [(0, 96), (96, 144), (144, 432)]
    for (start, end), (true_start, true_end) in zip(shots, truth):
        assert abs(start - true_start) <= 1 and abs(end - true_end) <= 1


def test_clips_kept_short_shot_rejected_long_shot_split(three_shots, three_shots_result):
    root, result = three_shots_result
    rows = result["rows"]
    # 4 s shot -> one clip; 12 s shot -> two even windows of 6 s.
    assert [r["num_frames"] for r in rows] == [96, 144, 144]
    assert [(round(r["start_s"], 2), round(r["end_s"], 2)) for r in rows] == [(0.0, 4.0), (6.0, 12.0), (12.0, 18.0)]
    sha8 = source_row(three_shots)["sha256"][:8]
    assert [r["clip_id"] for r in rows] == [f"{sha8}-000", f"{sha8}-001", f"{sha8}-002"]
    assert all(
        r["clip_key"] == f"P001_{r['clip_id']}" and r["video_path"] == f"video_clips/{r['clip_key']}.mp4" for r in rows
    )
    to_table("clips", rows)  # every CLIPS field present, with its type
    [short] = result["rejects"]
    assert short["reason_code"] == "shot_too_short" and short["stage"] == "scenes"
    assert short["item"] == f"{three_shots}#4.00-6.00"
    assert len(clip_files(root)) == 3  # no temporary files left behind


def test_clip_files_are_normalised_h264(three_shots_result):
    root, result = three_shots_result
    for row, colour in zip(result["rows"], [COLOURS[0], COLOURS[2], COLOURS[2]]):
        path = root / row["video_path"]
        info = probe(path)
        assert (info.height, info.width, info.codec, info.fps) == (H, W, "h264", FPS)
        frames = read_video(path)
        assert frames.shape == (row["num_frames"], H, W, 3)
        assert row["sha256"] == sha256_file(path)[0]
        # The clip shows its own shot only: the corner keeps the shot's flat colour throughout.
        assert np.abs(frames[:, :8, :8].reshape(-1, 3).mean(0) - colour).max() < 8


def test_rerun_writes_identical_rows(three_shots, three_shots_result):
    root, result = three_shots_result
    assert split_video(source_row(three_shots), str(root), small_cfg()) == result


def test_long_shot_to_the_end_is_split_evenly(tmp_path):
    video = make_video(tmp_path / "long.mp4", [25])
    result = split_video(source_row(video), str(tmp_path / "out"), small_cfg())
    assert [r["num_frames"] for r in result["rows"]] == [200, 200, 200]  # 3 x 8.33 s
    assert result["rejects"] == []

    off = split_video(source_row(video), str(tmp_path / "off"), small_cfg(split_long_shots=False))
    assert off["rows"] == [] and clip_files(tmp_path / "off") == []
    [too_long] = off["rejects"]
    assert too_long["reason_code"] == "shot_too_long" and too_long["item"].endswith("#0.00-25.00")


def test_long_shot_cut_early_keeps_its_last_window(tmp_path):
    # 14 s then 4 s: windows planned on the 18 s left (2 x 9 s); the cut ends the second at 5 s.
    video = make_video(tmp_path / "cut.mp4", [14, 4])
    result = split_video(source_row(video), str(tmp_path / "out"), small_cfg())
    assert [r["num_frames"] for r in result["rows"]] == [216, 120, 96]
    assert max(r["num_frames"] for r in result["rows"]) <= small_cfg().max_frames


def test_portrait_source_is_centre_cropped(tmp_path):
    frames = []
    for _ in range(4 * FPS):
        img = np.full((160, 96, 3), 255, np.uint8)  # portrait 96 x 160
        img[74:86, 42:54] = (255, 0, 0)  # red marker at the centre
        frames.append(img)
    path = tmp_path / "portrait.mp4"
    write_video(path, frames, FPS)
    [row] = split_video(source_row(path), str(tmp_path / "out"), small_cfg())["rows"]
    frame = read_video(tmp_path / "out" / row["video_path"])[10].astype(int)
    red = (frame[..., 0] > 180) & (frame[..., 1] < 90) & (frame[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert red.sum() > 50
    assert abs(ys.mean() - (H - 1) / 2) < 1.5 and abs(xs.mean() - (W - 1) / 2) < 1.5


def test_rotated_source_comes_out_upright(tmp_path):
    # Upright picture (what a viewer sees): portrait 96 x 144, red top half, blue bottom half.
    upright = np.zeros((144, 96, 3), np.uint8)
    upright[:72] = (220, 30, 30)
    upright[72:] = (30, 30, 220)
    # Stored landscape with a display matrix saying "rotate 90 degrees counter-clockwise".
    stored = np.ascontiguousarray(np.rot90(upright, k=-1))
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        stream.set_display_rotation(90)
        for i in range(4 * FPS):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert probe(path).rotation == 90

    [row] = split_video(source_row(path), str(tmp_path / "out"), small_cfg())["rows"]
    frame = read_video(tmp_path / "out" / row["video_path"])[0].astype(int)
    top, bottom = frame[: H // 2 - 4].reshape(-1, 3).mean(0), frame[H // 2 + 4 :].reshape(-1, 3).mean(0)
    assert top[0] > 180 and top[2] < 80  # red on top
    assert bottom[2] > 180 and bottom[0] < 80  # blue below


def test_variable_frame_rate_source_gives_constant_rate_clip(tmp_path):
    path = tmp_path / "vfr.mp4"
    gaps_ms = [20, 50, 33, 80, 40, 25, 60]
    pts, t = [], 0
    while t <= 4000:
        pts.append(t)
        t += gaps_ms[len(pts) % len(gaps_ms)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for p, img in zip(pts, shot_frames([len(pts) / FPS])):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = p, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert len(pts) != round(pts[-1] / 1000 * FPS) + 1  # the source frame count would be wrong

    [row] = split_video(source_row(path), str(tmp_path / "out"), small_cfg())["rows"]
    assert abs(row["num_frames"] - (round(pts[-1] / 1000 * FPS) + 1)) <= 1
    assert read_video(tmp_path / "out" / row["video_path"]).shape[0] == row["num_frames"]


def test_low_resolution_source_is_rejected(tmp_path):
    video = make_video(tmp_path / "small.mp4", [0.5], height=360, width=640)
    result = split_video(source_row(video), str(tmp_path / "out"), SceneConfig())
    assert result["rows"] == []
    [reject] = result["rejects"]
    assert reject["reason_code"] == "video_low_resolution" and "640x360" in reject["reason"]


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "audio"])
def test_unusable_inputs_become_reject_rows(tmp_path, three_shots, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = three_shots.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("<html>404 not found</html>\n")
    else:
        _audio_only(path)
    result = split_video(source_row(path), str(tmp_path / "out"), small_cfg())
    assert result["rows"] == [] and clip_files(tmp_path / "out") == []
    [reject] = result["rejects"]
    expected = {
        "empty": {"video_empty"},
        "truncated": {"video_unreadable", "video_undecodable"},
        "text": {"video_unreadable"},
        "audio": {"video_no_stream"},
    }[kind]
    assert reject["reason_code"] in expected and reject["item"] == str(path) and reject["reason"]


def test_corrupt_tail_keeps_the_clips_before_it(three_shots, tmp_path, monkeypatch):
    real_iter_frames = iter_frames

    def breaks_at_10s(uri, threads=0, fit=None):
        for t, img in real_iter_frames(uri, threads, fit):
            if t >= 10.0:
                raise VideoError("video_corrupt", "decoding stopped at 10.00 s: invalid data")
            yield t, img

    monkeypatch.setattr(scenes, "iter_frames", breaks_at_10s)
    result = split_video(source_row(three_shots), str(tmp_path / "out"), small_cfg())
    # The 4 s shot, then the good 4 s of the long shot (6-10 s; resample_cfr drops the frame it
    # held when the error came); the 2 s shot is still too short.
    first, second = result["rows"]
    assert (first["start_s"], first["end_s"], second["start_s"]) == pytest.approx((0.0, 4.0, 6.0))
    assert 10.0 - 1.01 / FPS <= second["end_s"] <= 10.0
    assert sorted(r["reason_code"] for r in result["rejects"]) == ["shot_too_short", "video_corrupt"]
    assert len(clip_files(tmp_path / "out")) == 2


@pytest.mark.parametrize("height, width", [(150, 250), (250, 150)])
def test_resizing_while_decoding_matches_fit_crop(tmp_path, height, width):
    # A smooth picture (a resize of noise), so two good area resamplers agree to about a level in
    # luma (swscale resizes chroma at its 4:2:0 resolution, so colours differ a little more).
    rng = np.random.default_rng(0)
    picture = cv2.resize(
        rng.integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8),
        (width, height),
        interpolation=cv2.INTER_CUBIC,
    )
    path = tmp_path / "src.mp4"
    write_video(path, [picture] * 3, FPS)
    fitted = [img for _, img in iter_frames(path, fit=(H, W))]
    cropped = [fit_crop(img, H, W) for _, img in iter_frames(path)]
    assert [f.shape for f in fitted] == [(H, W, 3)] * 3
    luma = [cv2.cvtColor(np.concatenate(frames), cv2.COLOR_RGB2GRAY).astype(int) for frames in (fitted, cropped)]
    assert np.abs(luma[0] - luma[1]).mean() < 2.0
