"""End to end on a tiny synthetic dataset: build-dataset -> precompute -> train (a few steps of
each stage) -> evaluate -> register -> look up @champion -> generate an mp4 (the CLI)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.generate import main as generate_cli
from storage import tracking
from storage.images import load_mask_png
from storage.layout import DatasetRoot
from storage.video import read_video
from tasks.training.evaluate import split_rows

pytestmark = pytest.mark.slow


def test_trained_model_is_registered_as_champion(trained_champion):
    trained, evaluation = trained_champion["train"], trained_champion["evaluation"]
    assert trained["stage"] == 2 and trained["global_step"] > 0
    assert evaluation["model"] == trained["model_uri"]
    assert evaluation["registry"]["registered"] and evaluation["registry"]["promoted"]
    client = MlflowClient()
    name = trained_champion["registry_name"]
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] in ([1], ["1"])
    for alias in (tracking.CHAMPION, tracking.CHALLENGER):
        version = client.get_model_version_by_alias(name, alias)
        assert str(version.version) == "1" and version.run_id == trained["run_id"]
    # The champion resolves to the trained model folder.
    folder = tracking.resolve_model_uri(f"models:/{name}@champion")
    assert (folder / "model_card.json").is_file() and (folder / "generator").is_dir()


def test_generate_from_champion_composites_into_the_input(trained_champion, split_dataset, tmp_path):
    row = split_rows(split_dataset, "test")[0]
    root = DatasetRoot(split_dataset)
    masked = root.path(row["masked_video_path"])
    output = tmp_path / "out.mp4"
    args = [
        "--masked-video",
        str(masked),
        "--masks",
        str(root.path(row["mask_dir"])),
        "--images",
        *[str(root.path(p)) for p in row["product_images"][:2]],
        "--caption",
        row["caption"],
        "--model",
        f"models:/{trained_champion['registry_name']}@champion",
        "--steps",
        "2",
        "--seed",
        "1",
        "--trim",
        "--output",
        str(output),
        "--device",
        "cpu",
    ]
    generate_cli(args)

    frames = read_video(output)
    expected = (row["num_frames"] - 1) // 4 * 4 + 1  # --trim: the first 4k+1 frames
    assert frames.shape == (expected, 96, 144, 3)
    source = read_video(masked)[:expected].astype(np.float32)
    masks = np.stack([load_mask_png(p) for p in sorted(root.path(row["mask_dir"]).glob("*.png"))[:expected]])
    # Outside the mask (and a margin: H.264 blurs edges) the output is the input, up to encoding.
    grown = masks.copy()
    for axis in (1, 2):
        for shift in (-4, 4):
            grown = grown | np.roll(masks, shift, axis=axis)
    outside = ~grown
    assert np.abs(frames.astype(np.float32) - source)[outside].mean() < 3.0
    # An existing output is never replaced silently.
    with pytest.raises(SystemExit):
        generate_cli(args)
