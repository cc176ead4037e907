"""Every way the photos reach the product DiT goes through the user's flows: the train flow
precomputes and trains it (from scratch, the PoC's stage), the evaluate flow generates from it.
(The default, `latents` with `gated` attention, is the tiny config that test_train.py runs.)"""

from __future__ import annotations

import pytest

from flows.evaluate import evaluate
from flows.train import train
from tasks.training.model_store import load_model_folder, read_model_card
from tests.fixtures_models import write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.mark.parametrize("reference,attention", [("latents", "joint"), ("clip", "gated"), ("both", "gated")])
def test_train_and_evaluate_each_reference_mode(split_dataset, local_mlflow, tmp_path, reference, attention):
    config = write_config(
        tmp_path / "tiny.yaml",
        split_dataset,
        local_mlflow,
        [
            f"model.reference={reference}",
            f"model.reference_attention={attention}",
            "train.stage1.trains=scratch",
            "train.stage1.max_steps=1",
            "train.stage2=null",
            "train.sample_every_epoch=0",
            "evaluate.max_clips=1",
            "evaluate.num_inference_steps=1",
            f"train.run_name=modes-{reference}-{attention}",
        ],
    )
    trained = train(config=str(config))
    generator, cfg = load_model_folder(trained["model_dir"])
    assert (cfg.model.reference, cfg.model.reference_attention) == (reference, attention)
    assert (generator.product_encoder is not None) == (reference != "latents")
    assert read_model_card(trained["model_dir"])["adapter_only"] is False  # a scratch run saves every weight
    summary = evaluate(model=trained["model_dir"], config=str(config), train_clips=0, register=False)
    assert summary["metrics"]["test"]["psnr_mask"] > 0
