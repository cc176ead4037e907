"""generate's input checks (before any model loads) and a generation from a local model folder."""

from __future__ import annotations

import numpy as np
import pytest

from flows.generate import GenerateInputError, load_inputs, nearest_valid_frames
from flows.generate import main as generate_cli
from storage.images import load_mask_png, save_png
from storage.video import read_video, write_video


def _inputs(folder, frames=9, height=32, width=48, mask_frames=None, mask_size=None, images=1):
    """A synthetic clip, per-frame mask PNGs and product photos; returns (video, masks dir, photos)."""
    rng = np.random.default_rng(0)
    video = folder / "clip.mp4"
    write_video(video, [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(frames)], fps=24)
    masks = folder / "masks"
    masks.mkdir()
    mh, mw = mask_size or (height, width)
    for i in range(mask_frames or frames):
        mask = np.zeros((mh, mw), np.uint8)
        mask[8:24, 8:24] = 255
        save_png(masks / f"{i:05d}.png", mask)
    photos = []
    for i in range(images):
        photos.append(folder / f"photo{i}.png")
        save_png(photos[-1], np.full((40, 40, 3), 200, np.uint8))
    return video, masks, [str(p) for p in photos]


def test_nearest_valid_frame_counts():
    assert nearest_valid_frames(50) == (49, 53) and nearest_valid_frames(49) == (49, 53)
    assert nearest_valid_frames(3) == (1, 5)


def test_wrong_frame_count_says_the_nearest_valid_counts_and_trim(tmp_path):
    video, masks, photos = _inputs(tmp_path, frames=11)
    with pytest.raises(GenerateInputError, match=r"11 frames.*nearest: 9 or 13.*--trim"):
        load_inputs(masks, photos, video=video)
    trimmed = load_inputs(masks, photos, video=video, trim=True)
    assert trimmed.blanked.shape == (9, 32, 48, 3) and trimmed.masks.shape == (9, 32, 48)
    assert trimmed.blanked[:, 8:24, 8:24].max() == 0  # the region to fill is blanked


@pytest.mark.parametrize("count", [0, 6])
def test_image_count_outside_one_to_five(tmp_path, count):
    video, masks, photos = _inputs(tmp_path, images=count)
    with pytest.raises(GenerateInputError, match=f"got {count} product images; pass 1 to 5"):
        load_inputs(masks, photos, video=video)


def test_masks_must_match_the_video(tmp_path):
    video, masks, photos = _inputs(tmp_path, mask_frames=5)
    with pytest.raises(GenerateInputError, match="9 frames but there are 5 masks"):
        load_inputs(masks, photos, video=video)
    other = tmp_path / "other"
    other.mkdir()
    video, masks, photos = _inputs(other, mask_size=(16, 48))
    with pytest.raises(GenerateInputError, match="masks are 48x16 but the video is 48x32"):
        load_inputs(masks, photos, video=video)


def test_size_must_be_a_multiple_of_16(tmp_path):
    video, masks, photos = _inputs(tmp_path, height=40)
    with pytest.raises(GenerateInputError, match="48x40; width and height must be multiples of 16"):
        load_inputs(masks, photos, video=video)


def test_cli_refuses_bad_input_and_existing_output_before_loading_a_model(tmp_path, capsys):
    video, masks, photos = _inputs(tmp_path, frames=10)
    base = ["--video", str(video), "--masks", str(masks), "--images", *photos, "--checkpoint", str(tmp_path / "none")]
    with pytest.raises(SystemExit):
        generate_cli([*base, "--output", str(tmp_path / "out.mp4")])
    assert "--trim" in capsys.readouterr().err
    (tmp_path / "taken.mp4").write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        generate_cli([*base, "--output", str(tmp_path / "taken.mp4"), "--trim"])
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "taken.mp4").read_bytes() == b"keep me"


def test_a_base_model_without_its_run_config_is_a_one_line_error(tmp_path, capsys):
    video, masks, photos = _inputs(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        generate_cli(
            [
                "--video",
                str(video),
                "--masks",
                str(masks),
                "--images",
                *photos,
                "--model",
                f"base:{tmp_path / 'missing.yaml'}",
                "--output",
                str(tmp_path / "out.mp4"),
            ]
        )
    assert stopped.value.code == 2 and "names no usable run config" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.slow
def test_generates_from_a_local_model_folder_with_a_mask_video(logged_model, tmp_path):
    import mlflow
    import torch

    torch.set_num_threads(1)
    folder = mlflow.artifacts.download_artifacts(logged_model, dst_path=str(tmp_path / "model"))
    video, masks, photos = _inputs(tmp_path, images=2)
    mask_video = tmp_path / "masks.mp4"
    write_video(
        mask_video,
        [np.repeat(load_mask_png(p)[..., None], 3, -1).astype(np.uint8) * 255 for p in sorted(masks.glob("*.png"))],
        fps=24,
    )
    output = tmp_path / "out.mp4"
    generate_cli(
        [
            "--video",
            str(video),
            "--masks",
            str(mask_video),
            "--images",
            *photos,
            "--checkpoint",
            folder,
            "--steps",
            "1",
            "--output",
            str(output),
            "--device",
            "cpu",
        ]
    )
    assert read_video(output).shape == (9, 32, 48, 3)
