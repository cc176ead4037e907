"""Benchmark build-dataset on a synthetic studio set with ground truth, on this machine.

Measures, in one run:
- scene cuts found vs true cuts (F1, a cut counts as found within +-1 frame);
- `classic` segmentation vs true masks (mean IoU over every frame of every clip);
- throughput: source-video seconds per wall second, first run;
- the pipeline's wall time divided by the time FFmpeg alone (the same libraries, through PyAV, on
  as many threads as the pipeline) needs to decode its inputs and encode its outputs (clips and
  masked videos, and the mask PNGs; also without the PNGs, as earlier runs measured it);
- a re-run with nothing changed, as a share of the first run;
- where the first run's time goes: task seconds per stage, from the Prefect API.

    python benchmarks/bench_build_dataset.py --products 8 --workdir /tmp/bench

Prints a table; figures go to docs/data-pipeline.md by hand with the command that made them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np

from demo.studio import StudioConfig, generate_studio
from flows.build_dataset import build_dataset
from storage.images import load_mask_png
from storage.layout import DatasetRoot
from storage.video import EncodeSettings, VideoWriter, fit_crop, iter_frames, read_video, resample_cfr
from tasks.dataset.scenes import SceneConfig, find_shots

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dataset" / "demo.yaml"  # weights-free backends


def cut_f1(source: Path, truth: dict, cfg: SceneConfig) -> tuple[float, int, int, int]:
    tp = fp = fn = 0
    for rel, t in truth.items():
        shots = find_shots(resample_cfr(iter_frames(source / rel), cfg.fps), cfg)
        found = [start for start, _ in shots[1:]]
        true = list(t["cuts"])
        for c in found:
            hit = next((x for x in true if abs(x - c) <= 1), None)
            if hit is None:
                fp += 1
            else:
                tp += 1
                true.remove(hit)
        fn += len(true)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return f1, tp, fp, fn


def mask_iou(root: DatasetRoot, truth_dir: Path, cuts: dict, scenes: SceneConfig) -> tuple[float, int]:
    ious = []
    for row in root.read_manifest("masks").to_pylist():
        clip = next(c for c in root.read_manifest("clips").to_pylist() if c["clip_key"] == row["clip_key"])
        video_rel = next(rel for rel in cuts if clip["source_uri"].endswith(rel))
        src_fps = cuts[video_rel]["fps"]
        first = int(round(clip["start_s"] * src_fps))
        stem = Path(video_rel).stem
        for i in range(row["num_frames"]):
            src_index = first + int(round(i * src_fps / scenes.fps))
            true = (
                np.asarray(
                    load_mask_png(truth_dir / "masks" / clip["product_id"] / stem / f"{src_index:05d}.png"), np.uint8
                )
                * 255
            )
            true = fit_crop(np.repeat(true[..., None], 3, axis=2), scenes.height, scenes.width)[..., 0] > 127
            pred = load_mask_png(root.path(row["mask_dir"]) / f"{i:05d}.png")
            union = np.logical_or(true, pred).sum()
            ious.append(np.logical_and(true, pred).sum() / union if union else 1.0)
    return float(np.mean(ious)), len(ious)


def ffmpeg_alone(
    sources: list[Path], videos: list[Path], mask_dirs: list[Path], settings: EncodeSettings, workers: int
) -> tuple[float, float, float]:
    """(decode s, video encode s, PNG encode s): decode every input; encode every output video and
    every mask PNG (FFmpeg's PNG encoder, at the pipeline's zlib level 1) from raw frames."""

    def decode(path: Path) -> None:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for _ in c.decode(s):
                pass

    def encode(frames: np.ndarray) -> None:
        with VideoWriter(io.BytesIO(), 24.0, frames.shape[1], frames.shape[2], settings) as w:
            for f in frames:
                w.write(f)

    def encode_png(masks: np.ndarray) -> None:
        codec = av.CodecContext.create("png", "w")
        codec.width, codec.height, codec.pix_fmt = masks.shape[2], masks.shape[1], "gray"
        codec.options = {"compression_level": "1"}
        for mask in masks:
            codec.encode(av.VideoFrame.from_ndarray(mask, format="gray"))

    def timed(fn, items) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, items))
        return time.perf_counter() - t0

    t_decode = timed(decode, sources)
    # Not timed: the frames an encoder would be handed.
    raw = [read_video(p) for p in videos]
    t_encode = timed(encode, raw)
    del raw
    masks = [np.stack([load_mask_png(p).astype(np.uint8) * 255 for p in sorted(d.glob("*.png"))]) for d in mask_dirs]
    return t_decode, t_encode, timed(encode_png, masks)


def stage_seconds(flow_run_id) -> dict[str, tuple[int, float]]:
    """{stage: (task runs, summed run seconds)} of one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    stages: dict[str, tuple[int, float]] = {}
    with get_client(sync_client=True) as client:
        offset = 0
        while page := client.read_task_runs(flow_run_filter=flow_runs, limit=200, offset=offset):
            for run in page:
                # "segment: <clip>" for per-item tasks, "ingest-4a3" (Prefect's suffix) for the others
                stage = run.name.split(":")[0] if ":" in run.name else run.name.rsplit("-", 1)[0]
                count, seconds = stages.get(stage, (0, 0.0))
                stages[stage] = (count + 1, seconds + run.total_run_time.total_seconds())
            offset += len(page)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/bench-build-dataset")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    source, truth, out = work / "source", work / "truth", work / "dataset"
    studio = generate_studio(source, truth, StudioConfig(num_products=args.products, seed=args.seed))
    cuts = json.loads((truth / "cuts.json").read_text())
    scenes = SceneConfig()

    params = dict(source=str(source), output=str(out), config=str(DEMO_CONFIG))
    t0 = time.perf_counter()
    state = build_dataset(**params, return_state=True)
    t_first = time.perf_counter() - t0
    summary = state.result()
    t0 = time.perf_counter()
    build_dataset(**params)
    t_rerun = time.perf_counter() - t0

    root = DatasetRoot(out.resolve())
    f1, tp, fp, fn = cut_f1(source, cuts, scenes)
    iou, frames = mask_iou(root, truth, cuts, scenes)
    sources = [source / rel for rel in cuts]
    outputs = sorted((out / "video_clips").glob("*.mp4")) + sorted((out / "masked_videos").glob("*.mp4"))
    mask_dirs = sorted(p for p in (out / "masks").iterdir() if p.is_dir())
    t_dec, t_enc, t_png = ffmpeg_alone(
        sources, outputs, mask_dirs, EncodeSettings(crf=scenes.crf, preset=scenes.preset), os.cpu_count() or 1
    )
    t_ffmpeg = t_dec + t_enc + t_png
    video_s = sum(c["num_frames"] / c["fps"] for c in cuts.values())

    rows = [
        ("products / source videos / source video s", f"{args.products} / {len(cuts)} / {video_s:.0f}"),
        ("clips in dataset / mask frames scored", f"{sum(summary['clips_per_split'].values())} / {frames}"),
        ("scene cuts F1 (tp/fp/fn)", f"{f1:.3f} ({tp}/{fp}/{fn})"),
        ("classic segmentation mean IoU", f"{iou:.3f}"),
        ("first run wall s", f"{t_first:.1f}"),
        ("throughput, source video s per wall s", f"{video_s / t_first:.2f}"),
        (
            "FFmpeg alone: decode inputs + encode videos + encode mask PNGs s",
            f"{t_dec:.1f} + {t_enc:.1f} + {t_png:.1f} = {t_ffmpeg:.1f}",
        ),
        ("pipeline / FFmpeg alone", f"{t_first / t_ffmpeg:.2f}"),
        ("pipeline / FFmpeg alone without the PNGs", f"{t_first / (t_dec + t_enc):.2f}"),
        ("re-run with nothing changed s (share of first)", f"{t_rerun:.1f} ({100 * t_rerun / t_first:.1f}%)"),
    ]
    print(f"\nbuild-dataset benchmark, {os.cpu_count()} cores, studio {studio}")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\nfirst run, per stage (task seconds: the sum of its tasks' run times)")
    print("| stage | tasks | task seconds |\n|---|---|---|")
    for stage, (count, seconds) in stage_seconds(state.state_details.flow_run_id).items():
        print(f"| {stage} | {count} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
