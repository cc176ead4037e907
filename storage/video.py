"""Video I/O through PyAV (which ships its own FFmpeg with libx264).

Reading yields frames as the viewer sees them: rotation metadata applied and non-square pixels
stretched to square, each with its presentation time, so variable-frame-rate sources resample
correctly. Writing makes H.264 yuv420p mp4 at a constant frame rate.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import fsspec
import numpy as np

from storage.rejects import RejectError


class VideoError(RejectError):
    """A file that cannot serve as a video; the message is the reject reason."""


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as displayed: after rotation and pixel aspect correction
    height: int
    rotation: int  # degrees, counter-clockwise, from the display matrix
    sample_aspect_ratio: float
    fps: float  # average rate as the container reports it
    duration_s: float
    codec: str


@contextlib.contextmanager
def open_container(uri: str | Path) -> Iterator[av.container.InputContainer]:
    """Open a local path or fsspec URI; any failure becomes a VideoError with a clear reason."""
    with contextlib.ExitStack() as stack:
        try:
            if isinstance(uri, Path) or "://" not in str(uri):
                source: object = str(uri)
                if Path(uri).stat().st_size == 0:
                    raise VideoError("video_empty", "file is empty (0 bytes)")
            else:
                source = stack.enter_context(fsspec.open(str(uri), "rb"))
            container = stack.enter_context(av.open(source, metadata_errors="ignore"))
        except VideoError:
            raise
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise VideoError("video_unreadable", f"not a readable video container: {exc}") from exc
        if not container.streams.video:
            kind = "audio-only file" if container.streams.audio else "container without streams"
            raise VideoError("video_no_stream", f"no video stream ({kind})")
        yield container


def _display_size(stream, rotation: int) -> tuple[int, int]:
    w, h = stream.codec_context.width, stream.codec_context.height
    sar = stream.sample_aspect_ratio
    if sar and sar > 0 and sar != 1:
        w = int(round(w * float(sar)))
    if rotation % 180:
        w, h = h, w
    return w, h


def probe(uri: str | Path) -> VideoInfo:
    """Read the header and the first frame; raises VideoError for what is not a usable video."""
    with open_container(uri) as container:
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream))
        except (StopIteration, av.error.FFmpegError) as exc:
            raise VideoError("video_undecodable", f"no decodable video frame: {exc}") from exc
        rotation = int(first.rotation or 0)
        w, h = _display_size(stream, rotation)
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        return VideoInfo(
            width=w,
            height=h,
            rotation=rotation,
            sample_aspect_ratio=float(stream.sample_aspect_ratio or 1),
            fps=float(stream.average_rate or stream.guessed_rate or 0),
            duration_s=duration,
            codec=stream.codec_context.name,
        )


def cover_size(width: int, height: int, box_h: int, box_w: int) -> tuple[int, int]:
    """(w, h) of a width x height image resized to cover box_h x box_w, aspect ratio kept."""
    scale = max(box_h / height, box_w / width)
    return max(box_w, int(round(width * scale))), max(box_h, int(round(height * scale)))


def centre_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    y, x = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    return np.ascontiguousarray(rgb[y : y + height, x : x + width])


def _frame_rgb(frame: av.VideoFrame, rotation: int, size: tuple[int, int]) -> np.ndarray:
    """The decoded frame as RGB at display `size` (w, h): swscale scales it (non-square pixels,
    or a requested output size) in the same pass that converts it to RGB, then it is turned upright."""
    w, h = (size[1], size[0]) if rotation % 180 else size  # the size before rotation
    if (w, h) == (frame.width, frame.height):
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
    if rotation % 360:
        # Display matrix rotation is counter-clockwise; np.rot90 with k>0 is counter-clockwise.
        rgb = np.ascontiguousarray(np.rot90(rgb, k=(rotation // 90) % 4))
    return rgb


def iter_frames(
    uri: str | Path, threads: int = 0, fit: tuple[int, int] | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (presentation time in s, H x W x 3 uint8 RGB) for every decodable frame.

    fit=(height, width): frames come as fit_crop(frame, height, width) would make them, but
    resized by swscale while it converts to RGB, one pass instead of a full-size conversion and
    an OpenCV resize.
    A truncated or corrupt tail ends the iteration with VideoError after the good frames.
    """
    with open_container(uri) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        size = None
        last_t = -1.0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                rotation = int(frame.rotation or 0)
                if size is None:
                    size = _display_size(stream, rotation)
                    if fit is not None:
                        size = cover_size(*size, *fit)
                t = float(frame.time)
                if t <= last_t:  # duplicated or out-of-order timestamps: keep the first
                    continue
                last_t = t
                rgb = _frame_rgb(frame, rotation, size)
                yield t, rgb if fit is None else centre_crop(rgb, *fit)
        except av.error.FFmpegError as exc:
            raise VideoError("video_corrupt", f"decoding stopped at {last_t:.2f} s: {exc}") from exc


def resample_cfr(frames: Iterable[tuple[float, np.ndarray]], fps: float) -> Iterator[tuple[int, np.ndarray]]:
    """Variable or other-rate frames -> constant `fps`: output frame i shows the source frame on
    screen at time t0 + i/fps (the latest frame whose timestamp is <= that time)."""
    t0 = None
    prev = None
    i = 0
    for t, img in frames:
        if t0 is None:
            t0 = t
        while prev is not None and t0 + i / fps < t - 1e-9:
            yield i, prev
            i += 1
        prev = img
    if prev is not None:  # show the last frame for one source-frame period at most
        yield i, prev


def fit_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover height x width keeping aspect ratio, then centre-crop (portrait too)."""
    h, w = rgb.shape[:2]
    size = cover_size(w, h, height, width)
    interp = cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR
    return centre_crop(cv2.resize(rgb, size, interpolation=interp), height, width)


def work_size(height: int, width: int, work_height: int | None) -> tuple[int, int]:
    """(h, w) of a height x width frame scaled to work_height lines, aspect kept (even sizes, as
    H.264 frames are), never upscaled; unchanged for None."""
    if work_height is None or work_height >= height:
        return height, width
    return work_height, 2 * round(width * work_height / height / 2)


@dataclass(frozen=True)
class EncodeSettings:
    crf: int = 18
    preset: str = "veryfast"
    threads: int = 1  # per encoder; parallelism comes from encoding several clips at once
    # x264's macroblock tree makes identical input encode to different bytes from run to run;
    # without it outputs (and so their content hashes) are reproducible, at a small size cost.
    x264_params: str = "mbtree=0"


class VideoWriter:
    """Streaming H.264 writer: `with VideoWriter(path, fps, h, w) as w: w.write(rgb)`."""

    def __init__(
        self,
        target: str | Path | io.BytesIO,
        fps: float,
        height: int,
        width: int,
        settings: EncodeSettings = EncodeSettings(),
    ):
        # A BytesIO target encodes in memory (to measure what H.264 does without touching disk).
        self._container = av.open(target if isinstance(target, io.BytesIO) else str(target), mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.thread_count = settings.threads
        self._stream.options = {
            "crf": str(settings.crf),
            "preset": settings.preset,
            "x264-params": settings.x264_params,
        }
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        self._container.mux(self._stream.encode())
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._container.close()


def write_video(
    target: str | Path | io.BytesIO,
    frames: Iterable[np.ndarray],
    fps: float,
    settings: EncodeSettings = EncodeSettings(),
) -> int:
    writer = None
    for rgb in frames:
        if writer is None:
            writer = VideoWriter(target, fps, rgb.shape[0], rgb.shape[1], settings)
        writer.write(rgb)
    if writer is None:
        raise ValueError("no frames to write")
    writer.close()
    return writer.frames


def read_video(uri: str | Path, work_height: int | None = None) -> np.ndarray:
    """All frames of a (short) clip as T x H x W x 3 uint8; with work_height, each downscaled to
    `work_size` by OpenCV (its area resize by an integer factor is cheaper than swscale's)."""
    frames = []
    for _, img in iter_frames(uri):
        size = work_size(*img.shape[:2], work_height)
        frames.append(img if size == img.shape[:2] else fit_crop(img, *size))
    if not frames:
        raise VideoError("video_undecodable", "no decodable video frame")
    return np.stack(frames)
