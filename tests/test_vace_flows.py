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
from storage.images import save_png
from storage.video import read_video
from tests.issue4_fixtures import REPO
from tests.test_generate import _inputs

pytestmark = pytest.mark.slow
TINY_VACE = REPO / "configs" / "tiny-vace.yaml"


@pytest.fixture(scope="module")
def vace_config(split_dataset, local_mlflow, tmp_path_factory) -> Path:
    """configs/tiny-vace.yaml pointed at the test dataset and MLflow store, as a file."""
    from tasks.run_config import load_run_config

    config = load_run_config(TINY_VACE, [f"data.root={split_dataset}", f"mlflow.data_dir={local_mlflow}",
                                         f"train.runs_dir={local_mlflow / 'runs'}", "evaluate.max_clips=2",
                                         "evaluate.num_inference_steps=2", "train.sample_every_epoch=0"])
    path = tmp_path_factory.mktemp("vace") / "tiny-vace.yaml"
    path.write_text(config.to_yaml())
    return path


def test_zero_shot_vace_and_its_fine_tuned_lora_are_evaluated_side_by_side(vace_config):
    import torch

    torch.set_num_threads(1)
    trained = train(config=str(vace_config))
    assert trained["stage"] == 1 and trained["global_step"] == 2  # stage 1 trains the LoRA, no stage 2
    summary = evaluate(model=trained["model_uri"], config=str(vace_config), train_clips=0, register=False,
                       baseline=f"base:{vace_config}")
    ours, zero_shot = summary["metrics"]["test"], summary["baseline"]["metrics"]["test"]
    assert ours["psnr_mask"] > 0 and zero_shot["psnr_mask"] > 0
    assert ours["psnr_mask"] != zero_shot["psnr_mask"]  # the LoRA trained: not the zero-shot model any more
    assert summary["baseline"]["registry"] == {"registered": False, "reason": "register is false"}
    table = Artifact.get("evaluation-comparison")
    assert table is not None and f"base:{vace_config}" in table.data


def test_zero_shot_generate_reads_the_photos(vace_config, tmp_path):
    import torch

    torch.set_num_threads(1)
    outputs = []
    for colour in (40, 220):
        folder = tmp_path / str(colour)
        folder.mkdir()
        video, masks, _ = _inputs(folder)
        photo = folder / "photo.png"
        save_png(photo, np.full((40, 40, 3), colour, np.uint8))
        output = folder / "out.mp4"
        generate_cli(["--video", str(video), "--masks", str(masks), "--images", str(photo), "--model",
                      f"base:{vace_config}", "--steps", "2", "--output", str(output), "--device", "cpu"])
        outputs.append(read_video(output).astype(np.float32))
    inside = np.zeros(outputs[0].shape[:3], bool)
    inside[:, 8:24, 8:24] = True
    difference = np.abs(outputs[0] - outputs[1])
    # other photos, another product; outside the mask both are the input (up to H.264 near the edge)
    assert difference[inside].mean() > 1.0 and difference[inside].mean() > 10 * difference[~inside].mean()
