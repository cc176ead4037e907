"""Scenes stage: one source video -> normalised clips (H x W, constant fps, H.264), one per shot window.

The source is decoded once, in a single streaming pass:

    iter_frames (upright, square pixels, resized and cropped to height x width while decoding)
    -> resample_cfr (cfg.fps) -> iter_shot_frames:
        a downscaled BGR copy feeds PySceneDetect's detector (`process_frame`),
        the frame waits out the detector's look-ahead and then comes out tagged with its shot
    -> _ClipCutter: cuts each shot into windows and encodes each window to video_clips/{clip_key}.mp4

Memory stays bounded by one clip window (at most max_clip_s of H x W frames) plus the detector's
look-ahead, whatever the length of the source.

Long shots (split_long_shots): the length of a shot is only known when it ends, so windows are
planned against what is left of the *video* (from the probed duration): a window starting at
frame a gets ceil(left / n) frames with n = ceil(left / max_frames). A long shot that runs to the
end of the video, the common case in product showcases, is thus split evenly (25 s -> 3 x 8.33 s);
one that a cut ends earlier keeps its last, shorter window if it lasts min_clip_s, else that tail
becomes a "shot_tail_too_short" reject row.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field, model_validator
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from storage.hashing import sha256_file
from storage.layout import DatasetRoot, clip_key
from storage.rejects import reject_row
from storage.video import EncodeSettings, VideoError, VideoWriter, iter_frames, probe, resample_cfr
from tasks.dataset.stage import StageResult, stage_task

STAGE = "scenes"


class SceneConfig(BaseModel):
    model_config = {"extra": "forbid"}  # a misspelt key in a build config is an error, not ignored
    # Shot detection (PySceneDetect 0.7), on frames downscaled to detect_width.
    detector: Literal["adaptive", "content"] = "adaptive"
    adaptive_threshold: float = 3.0  # AdaptiveDetector: score / rolling mean of neighbours
    adaptive_min_content_val: float = 15.0  # AdaptiveDetector: the score must also reach this
    adaptive_window_width: int = Field(2, ge=1)  # AdaptiveDetector: frames each side averaged
    content_threshold: float = 27.0  # ContentDetector: fixed HSV-difference threshold
    min_scene_len: int = Field(15, ge=1)  # frames (at fps) a cut must lie from the previous one
    detect_width: int = Field(240, ge=16)  # a third of the clip width: OpenCV's fast integer-factor resize
    # Clip windows.
    min_clip_s: float = Field(3.0, gt=0)
    max_clip_s: float = Field(10.0, gt=0)
    split_long_shots: bool = True
    min_short_side: int | None = 720  # sources smaller on their short side are dropped
    # Output format.
    height: int = 480
    width: int = 720
    fps: float = 24.0
    crf: int = 18
    preset: str = "veryfast"

    @model_validator(mode="after")
    def _windows_fit(self) -> SceneConfig:
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_clip_s={self.min_clip_s} must not exceed max_clip_s={self.max_clip_s}")
        return self

    @property
    def min_frames(self) -> int:
        return math.ceil(self.min_clip_s * self.fps - 1e-6)

    @property
    def max_frames(self) -> int:
        return math.floor(self.max_clip_s * self.fps + 1e-6)


def _make_detector(cfg: SceneConfig) -> ContentDetector:
    if cfg.detector == "adaptive":
        return AdaptiveDetector(
            adaptive_threshold=cfg.adaptive_threshold,
            min_scene_len=cfg.min_scene_len,
            window_width=cfg.adaptive_window_width,
            min_content_val=cfg.adaptive_min_content_val,
        )
    return ContentDetector(threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_len)


def _detection_frame(rgb: np.ndarray, width: int) -> np.ndarray:
    """The frame as PySceneDetect reads it: BGR, downscaled to `width` (never upscaled)."""
    h, w = rgb.shape[:2]
    if w > width:
        rgb = cv2.resize(rgb, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def iter_shot_frames(
    frames: Iterable[tuple[int, np.ndarray]],
    cfg: SceneConfig,
    prepare: Callable[[np.ndarray], object] = lambda rgb: rgb,
) -> Iterator[tuple[int, int, object]]:
    """CFR frames (index, RGB) -> (shot number, index, prepare(frame)), in order.

    The detector reports a cut up to `event_buffer_length` frames after it happened, so each
    frame is held (as `prepare` made it: keep only what the caller needs) until no later report
    can move it into a new shot. If the source fails mid-stream (VideoError), the frames before
    the failure still come out, as if the video ended there, and then the error is raised.
    """
    detector = _make_detector(cfg)
    rate = Fraction(cfg.fps).limit_denominator(1001)
    held: deque[tuple[int, object]] = deque()
    cuts: deque[int] = deque()
    shot = 0

    def release() -> tuple[int, int, object]:
        nonlocal shot
        index, item = held.popleft()
        if cuts and cuts[0] <= index:  # a cut starts a new shot at this frame
            while cuts and cuts[0] <= index:
                cuts.popleft()
            shot += 1
        return shot, index, item

    index = None
    failure = None
    try:
        for index, rgb in frames:
            found = detector.process_frame(FrameTimecode(index, rate), _detection_frame(rgb, cfg.detect_width))
            cuts.extend(tc.frame_num for tc in found)
            held.append((index, prepare(rgb)))
            while len(held) > detector.event_buffer_length:
                yield release()
    except VideoError as exc:
        failure = exc
    if index is not None:
        cuts.extend(tc.frame_num for tc in detector.post_process(FrameTimecode(index, rate)))
    while held:
        yield release()
    if failure is not None:
        raise failure


def find_shots(frames: Iterable[tuple[int, np.ndarray]], cfg: SceneConfig) -> list[tuple[int, int]]:
    """Shots as [start, end) output-frame ranges of CFR frames (resample_cfr output), found by the
    same detection split_video runs; for benchmarks that compare cut frames with the truth."""
    shots: dict[int, list[int]] = {}
    for shot, index, _ in iter_shot_frames(frames, cfg, prepare=lambda _rgb: None):
        shots.setdefault(shot, [index, index])[1] = index + 1
    return [(start, end) for start, end in shots.values()]


class _Window:
    """Frames of one clip window: held until it reaches min_clip_s (so a too-short window costs no
    encoding), then, if `stream`, written to the encoder as they come; otherwise kept until close."""

    def __init__(self, start: int, target: float, stream: bool):
        self.start = start
        self.target = target  # length at which the window closes by itself (inf: at the shot end)
        self.length = 0
        self._stream = stream
        self._held: list[np.ndarray] = []
        self._writer: VideoWriter | None = None

    def add(self, frame: np.ndarray, min_frames: int, open_writer: Callable[[], VideoWriter]) -> None:
        self.length += 1
        if self._writer is not None:
            self._writer.write(frame)
            return
        self._held.append(frame)
        if self._stream and self.length >= min_frames:
            self.flush_to(open_writer())

    def flush_to(self, writer: VideoWriter) -> None:
        self._writer = writer
        for frame in self._held:
            writer.write(frame)
        self._held.clear()

    @property
    def writing(self) -> bool:
        return self._writer is not None


class _ClipCutter:
    """Consumes (shot, index, normalised frame) in order; encodes the kept windows and records the
    clip rows and reject rows. Only one clip file is open at a time."""

    def __init__(self, video: dict, root: DatasetRoot, cfg: SceneConfig, expected_frames: int):
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self._video, self._root, self._cfg = video, root, cfg
        self._t0 = 0.0  # source time of output frame 0
        self._end = 0  # output frames seen so far
        self._expected_frames = expected_frames
        self._settings = EncodeSettings(crf=cfg.crf, preset=cfg.preset)
        self._files = contextlib.ExitStack()  # the open clip: atomic temp file + encoder
        self._shot: int | None = None
        self._shot_start = 0
        self._shot_too_long = False
        self._window: _Window | None = None

    # -- public -------------------------------------------------------------------------------
    def cut(self, frames: Iterator[tuple[float, np.ndarray]]) -> None:
        """Decode-order source frames (time, RGB at height x width) -> clips; a VideoError mid-stream is raised after
        the frames before it were cut, so `finish` can still keep them."""
        first = next(frames, None)
        if first is None:
            raise VideoError("video_undecodable", "no decodable video frame")
        self._t0 = first[0]
        cfr = resample_cfr(itertools.chain([first], frames), self._cfg.fps)
        for shot, index, frame in iter_shot_frames(cfr, self._cfg):
            self._add(shot, index, frame)

    def finish(self) -> None:
        """The video ended (or broke off): close its last shot."""
        self._end_shot(self._end)

    def abort(self) -> None:
        """Call from an `except` block: the open clip's temporary file is removed."""
        self._files.__exit__(*sys.exc_info())

    def _add(self, shot: int, index: int, frame: np.ndarray) -> None:
        self._end = index + 1
        if shot != self._shot:
            self._end_shot(index)
            self._shot, self._shot_start, self._shot_too_long = shot, index, False
            self._window = self._new_window(index)
        if self._shot_too_long:
            return
        if not self._cfg.split_long_shots and index - self._shot_start >= self._cfg.max_frames:
            self._shot_too_long = True  # drop what is held; the reject row comes at the shot's end
            self._window = None
            return
        self._window.add(frame, self._cfg.min_frames, self._open_clip)
        if self._window.length >= self._window.target:
            self._close_window()
            self._window = self._new_window(index + 1)

    # -- shots and windows --------------------------------------------------------------------
    def _new_window(self, start: int) -> _Window:
        if not self._cfg.split_long_shots:
            return _Window(start, target=math.inf, stream=False)
        left = self._expected_frames - start
        pieces = math.ceil(left / self._cfg.max_frames)
        even = math.ceil(left / pieces) if pieces > 1 else self._cfg.max_frames
        target = min(self._cfg.max_frames, max(self._cfg.min_frames, even))
        return _Window(start, target=target, stream=True)

    def _end_shot(self, end: int) -> None:
        if self._shot is None:
            return
        cfg = self._cfg
        if self._shot_too_long:
            self._reject(
                self._shot_start,
                end,
                "shot_too_long",
                f"shot of {(end - self._shot_start) / cfg.fps:.2f} s is longer than max_clip_s={cfg.max_clip_s} "
                "and split_long_shots is off",
            )
        elif end - self._shot_start < cfg.min_frames:
            self._reject(
                self._shot_start,
                end,
                "shot_too_short",
                f"shot of {(end - self._shot_start) / cfg.fps:.2f} s is shorter than min_clip_s={cfg.min_clip_s}",
            )
        elif self._window is not None and self._window.length >= cfg.min_frames:
            self._close_window()
        elif self._window is not None and self._window.length > 0:
            self._reject(
                self._window.start,
                end,
                "shot_tail_too_short",
                f"last {self._window.length / cfg.fps:.2f} s of a long shot is shorter than "
                f"min_clip_s={cfg.min_clip_s}; the shot's earlier windows were kept",
            )
        self._window = None

    def _reject(self, start: int, end: int, code: str, reason: str) -> None:
        item = f"{self._video['uri']}#{self._time(start):.2f}-{self._time(end):.2f}"
        self.rejects.append(reject_row(STAGE, item, code, reason, self._video["product_id"]))

    def _time(self, index: int) -> float:
        """Source presentation time of output frame `index`."""
        return self._t0 + index / self._cfg.fps

    # -- clip files ---------------------------------------------------------------------------
    def _clip_names(self) -> tuple[str, str, str]:
        clip_id = f"{self._video['sha256'][:8]}-{len(self.rows):03d}"
        key = clip_key(self._video["product_id"], clip_id)
        return clip_id, key, DatasetRoot.clip_video_rel(key)

    def _open_clip(self) -> VideoWriter:
        *_, rel = self._clip_names()
        tmp = self._files.enter_context(self._root.atomic_file(rel))
        cfg = self._cfg
        return self._files.enter_context(VideoWriter(tmp, cfg.fps, cfg.height, cfg.width, self._settings))

    def _close_window(self) -> None:
        window = self._window
        if not window.writing:
            window.flush_to(self._open_clip())
        self._files.close()  # flush the encoder, then move the file to its final name
        clip_id, key, rel = self._clip_names()
        digest, _ = sha256_file(self._root.path(rel))
        cfg = self._cfg
        self.rows.append(
            {
                "clip_key": key,
                "product_id": self._video["product_id"],
                "clip_id": clip_id,
                "source_uri": self._video["uri"],
                "source_sha256": self._video["sha256"],
                "start_s": self._time(window.start),
                "end_s": self._time(window.start + window.length),
                "num_frames": window.length,
                "fps": cfg.fps,
                "height": cfg.height,
                "width": cfg.width,
                "video_path": rel,
                "sha256": digest,
            }
        )


def split_video(video: dict, root: str, cfg: SceneConfig) -> StageResult:
    """One `source_files` row (role "video") -> CLIPS rows + reject rows; see the module docstring."""
    uri, product_id = video["uri"], video["product_id"]
    try:
        info = probe(uri)
    except VideoError as exc:
        return {"rows": [], "rejects": [reject_row(STAGE, uri, exc.code, str(exc), product_id)]}
    if cfg.min_short_side is not None and min(info.width, info.height) < cfg.min_short_side:
        reason = f"{info.width}x{info.height} is under {cfg.min_short_side}p on its short side"
        return {"rows": [], "rejects": [reject_row(STAGE, uri, "video_low_resolution", reason, product_id)]}

    cutter = _ClipCutter(video, DatasetRoot(Path(root)), cfg, expected_frames=round(info.duration_s * cfg.fps))
    broken: list[dict] = []
    try:
        try:
            cutter.cut(iter_frames(uri, fit=(cfg.height, cfg.width)))
        except VideoError as exc:  # a corrupt tail: the clips cut before it are kept
            broken.append(reject_row(STAGE, uri, exc.code, str(exc), product_id))
        cutter.finish()
    except BaseException:
        cutter.abort()
        raise
    return {"rows": cutter.rows, "rejects": cutter.rejects + broken}


scenes_task = stage_task("scenes", "2")(split_video)
