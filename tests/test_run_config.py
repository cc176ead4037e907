"""Run configs (YAML + dotted overrides) and model folders (save / load / wrong-config errors)."""

from pathlib import Path

import pytest
import torch

from models.spec import specification
from tasks.training.model_store import (
    IncompatibleCheckpointError,
    load_model_folder,
    load_pipeline,
    read_model_card,
    resolve_model_config,
    save_model_folder,
)
from tasks.training.run_config import flatten, load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["tiny", "poc-1.3b", "prod-14b"])
def test_shipped_configs_load(name):
    cfg = load_run_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name and (cfg.data.frames - 1) % 4 == 0
    assert cfg.train.optimizer.betas == (0.9, 0.999) and cfg.train.optimizer.weight_decay == 0.01


def test_poc_config_has_the_seed_values():
    cfg = load_run_config(CONFIGS / "poc-1.3b.yaml")
    assert (cfg.train.stage1.epochs, cfg.train.stage1.batch_size, cfg.train.stage1.learning_rate) == (50, 4, 1e-4)
    assert (cfg.train.stage2.epochs, cfg.train.stage2.batch_size, cfg.train.stage2.learning_rate) == (100, 2, 1e-5)
    assert cfg.train.warmup_steps == 1000
    assert (cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.max_product_images) == (49, 480, 720, 4)
    assert cfg.model.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_overrides_are_typed_and_validated():
    base = load_run_config(CONFIGS / "tiny.yaml")
    cfg = load_run_config(
        CONFIGS / "tiny.yaml",
        ["train.stage1.max_steps=7", "train.ema_decay=null", "model.sampler.num_inference_steps=3", "data.frames=13"],
    )
    assert (cfg.train.stage1.max_steps, cfg.train.ema_decay, cfg.data.frames) == (7, None, 13)
    assert cfg.model.sampler.num_inference_steps == 3
    assert cfg.fingerprint() != base.fingerprint()
    with pytest.raises(ValueError, match="4k\\+1"):
        load_run_config(CONFIGS / "tiny.yaml", ["data.frames=10"])
    with pytest.raises(ValueError, match="learning_rat"):
        load_run_config(CONFIGS / "tiny.yaml", ["train.stage1.learning_rat=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_run_config(CONFIGS / "tiny.yaml", ["train.seed"])
    params = flatten(cfg.model_dump(mode="json"))
    assert params["train.stage1.max_steps"] == 7 and params["model.base_model"] == "tiny"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    cfg = load_run_config(CONFIGS / "tiny.yaml", [f"mlflow.data_dir={data_dir}"])
    torch.manual_seed(0)
    generator = specification(resolve_model_config(cfg.model, data_dir)).build_generator()
    with torch.no_grad():  # open the gates so the saved weights differ from a fresh model
        for name, parameter in generator.named_parameters():
            if name.endswith("processor.gate") or name.startswith("transformer.wan.blocks.0.ffn"):
                parameter.add_(0.5)
    return cfg, generator


@pytest.mark.parametrize("adapter_only", [True, False])
def test_model_folder_round_trip(tiny_run, tmp_path, adapter_only):
    cfg, generator = tiny_run
    folder = save_model_folder(tmp_path / "model", generator, cfg, adapter_only, {"stage": 1, "step": 3})
    assert {p.name for p in folder.iterdir()} == {"run_config.yaml", "generator", "model_card.json"}
    assert (folder / "generator/transformer/adapter_config.json").is_file() == adapter_only
    card = read_model_card(folder)
    assert card["step"] == 3 and card["adapter_only"] == adapter_only and card["base_model"] == "tiny"

    loaded, loaded_cfg = load_model_folder(folder, expect=cfg.model)
    assert loaded_cfg == cfg
    saved = generator.state_dict()
    for name, value in loaded.state_dict().items():
        if adapter_only and name.startswith("transformer.wan.blocks.0.ffn"):
            # an adapter carries only the new weights: Wan's own come from the base again
            assert not torch.equal(value, saved[name]), name
        else:
            assert torch.equal(value, saved[name]), name


def test_pipeline_loads_from_a_model_folder(tiny_run, tmp_path):
    cfg, generator = tiny_run
    folder = save_model_folder(tmp_path / "model", generator, cfg, adapter_only=True)
    pipe, loaded_cfg = load_pipeline(folder)
    assert loaded_cfg.name == "tiny" and pipe.config.text_max_length == cfg.model.text_max_length
    assert torch.equal(
        pipe.transformer.wan.blocks[1].attn1.processor.gate, generator.transformer.wan.blocks[1].attn1.processor.gate
    )


def test_a_model_folder_of_another_config_is_refused(tiny_run, tmp_path):
    cfg, generator = tiny_run
    folder = save_model_folder(tmp_path / "model", generator, cfg, adapter_only=False)
    other = cfg.model.model_copy(update={"reference_lora_rank": 4})
    with pytest.raises(IncompatibleCheckpointError, match="reference_lora_rank: checkpoint 16 vs config 4"):
        load_model_folder(folder, expect=other)
    # A folder whose weights and run_config.yaml disagree (hand-assembled) is refused too.
    (folder / "run_config.yaml").write_text(cfg.model_copy(update={"model": other}).to_yaml())
    with pytest.raises(IncompatibleCheckpointError, match="as its run_config.yaml describes"):
        load_model_folder(folder)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model_folder(tmp_path)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_the_command_lines_answer_a_bad_config_in_one_line(command, tmp_path, capsys):
    from flows.evaluate import main as evaluate_cli
    from flows.train import main as train_cli

    cli = {"train": train_cli, "evaluate": evaluate_cli}[command]
    for argv, says in (
        (
            ["--config", str(CONFIGS / "tiny.yaml"), "--set", "train.stage1.learning_rat=1"],
            "train.stage1.learning_rat: unknown key (train.stage1 takes: trains, epochs",
        ),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml not found (see configs/*.yaml)"),
    ):
        with pytest.raises(SystemExit) as stopped:
            cli(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and says in err and err.count("\n") == 1, err
