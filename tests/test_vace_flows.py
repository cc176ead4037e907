"""The vace backend through the user's flows on tiny VACE components: zero-shot VACE scored by the
evaluate flow (`base:<run config>`), its LoRA fine-tuned by the train flow, the two reported side
by side, and a zero-shot generate call that reads the photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prefect.artifacts import Artifact

from flows.evaluate import evaluate
from flows.generate import main as generate_cli
from flows.train import train
from storage.video import read_video
from tests.fixtures_dataset import REPO
from tests.test_generate import _inputs

pytestmark = pytest.mark.slow
TINY_VACE = REPO / "configs" / "tiny-vace.yaml"


@pytest.fixture(scope="module")
def vace_config(split_dataset, local_mlflow, tmp_path_factory) -> Path:
    """configs/tiny-vace.yaml pointed at the test dataset and MLflow store, as a file."""
    from tasks.training.run_config import load_run_config

    config = load_run_config(
        TINY_VACE,
        [
            f"data.root={split_dataset}",
            f"mlflow.data_dir={local_mlflow}",
            f"train.runs_dir={local_mlflow / 'runs'}",
            "evaluate.max_clips=2",
            "evaluate.num_inference_steps=2",
            "train.sample_every_epoch=0",
            # 9 frames are 3 latent frames: diffusers' VACE takes at most 3 references
            "data.max_product_images=2",
        ],
    )
    path = tmp_path_factory.mktemp("vace") / "tiny-vace.yaml"
    path.write_text(config.to_yaml())
    return path


def test_zero_shot_vace_and_its_fine_tuned_lora_are_evaluated_side_by_side(vace_config):
    import torch

    torch.set_num_threads(1)
    trained = train(config=str(vace_config))
    assert trained["stage"] == 1 and trained["global_step"] == 2  # stage 1 trains the LoRA, no stage 2
    summary = evaluate(
        model=trained["model_uri"],
        config=str(vace_config),
        train_clips=0,
        register=False,
        baseline=f"base:{vace_config}",
    )
    ours, zero_shot = summary["metrics"]["test"], summary["baseline"]["metrics"]["test"]
    assert ours["psnr_mask"] > 0 and zero_shot["psnr_mask"] > 0
    assert ours["psnr_mask"] != zero_shot["psnr_mask"]  # the LoRA trained: not the zero-shot model any more
    assert summary["baseline"]["registry"] == {"registered": False, "reason": "register is false"}
    table = Artifact.get("evaluation-comparison")
    assert table is not None and f"base:{vace_config}" in table.data


def test_zero_shot_generate_from_a_base_uri_reads_the_photos(vace_config, tmp_path):
    import torch

    from tasks.training.model_store import load_pipeline

    torch.set_num_threads(1)
    video, masks, photos = _inputs(tmp_path, images=2)
    output = tmp_path / "out.mp4"
    generate_cli(
        [
            "--video",
            str(video),
            "--masks",
            str(masks),
            "--images",
            *photos,
            "--model",
            f"base:{vace_config}",
            "--steps",
            "2",
            "--output",
            str(output),
            "--device",
            "cpu",
        ]
    )
    assert read_video(output).shape == (9, 32, 48, 3)
    # The same base through the loader generate uses: other photos, another video (random tiny
    # weights move it little, but they move it), and outside the mask always the input.
    pipe, _ = load_pipeline(f"base:{vace_config}")
    clip = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 9, 32, 48)
    mask[..., 8:24, 8:24] = 1
    dark, light = ([np.full((40, 40, 3), colour, np.uint8)] for colour in (40, 220))
    outputs = [
        pipe(
            clip * (1 - mask),
            mask,
            [photo],
            "bottle",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
        )
        for photo in (dark, light)
    ]
    inside = mask.expand_as(outputs[0]).bool()
    assert (outputs[0] - outputs[1])[inside].abs().max() > 0
    assert torch.equal(outputs[0][~inside], outputs[1][~inside]) and torch.equal(outputs[0][~inside], clip[~inside])
