"""build-dataset's config: the shipped YAMLs, --set overrides, one-line errors (exit 2 on the
command line), the config a dataset root records, and what a rebuild with another config does."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.build_dataset import DEFAULT_CONFIG, main
from storage.config_files import ConfigError
from storage.layout import DatasetRoot
from tasks.dataset.build_config import (
    BuildConfig,
    differences,
    load_build_config,
    rebuild_plan,
    recorded_build_config,
    resolve_build_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"


def test_the_default_yaml_is_the_code_defaults():
    # build-dataset given no config builds as it did when its options were flow parameters:
    # Grounding DINO + SAM2, rembg, and every stage's own defaults.
    assert DEFAULT_CONFIG == CONFIGS / "default.yaml"
    default = load_build_config(DEFAULT_CONFIG)
    assert default == BuildConfig() and default.name == "default"
    assert (default.segmentation.backend, default.images.backend) == ("grounded-sam2", "rembg")
    # Every key is spelled out, so the file documents them all.
    text = DEFAULT_CONFIG.read_text()
    for section, values in BuildConfig().model_dump(exclude={"name"}).items():
        for key in values:
            assert f"\n  {key}:" in text, f"{section}.{key} is not in default.yaml"


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_the_shipped_configs_use_the_weights_free_backends(name):
    cfg = load_build_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name and (cfg.segmentation.backend, cfg.images.backend) == ("classic", "classic")
    if name == "demo":  # otherwise the defaults
        assert differences(BuildConfig(), cfg) == [
            "segmentation.backend: 'grounded-sam2' -> 'classic'",
            "images.backend: 'rembg' -> 'classic'",
        ]


def test_overrides_are_typed_and_validated():
    cfg = load_build_config(
        CONFIGS / "demo.yaml",
        ["scenes.min_short_side=null", "splits.ratios=[0.6,0.2,0.2]", "segmentation.dilate_px=2", "name=mine"],
    )
    assert cfg.scenes.min_short_side is None and cfg.splits.ratios == (0.6, 0.2, 0.2)
    assert cfg.segmentation.dilate_px == 2 and cfg.name == "mine"
    assert cfg.segmentation.backend == "classic"  # the file's value where no override says otherwise


@pytest.mark.parametrize(
    "override, says",
    [
        ("scenes.fsp=30", "scenes.fsp: unknown key (scenes takes: detector, "),
        (
            "scene.fps=30",
            "scene: unknown key (the top level takes: name, scenes, segmentation, masking, images, splits)",
        ),
        ("segmentation.backend=sam", "segmentation.backend: Input should be 'grounded-sam2' or 'classic' (got 'sam')"),
        ("masking.crf=99", "masking.crf: Input should be less than or equal to 51 (got 99)"),
        ("scenes.min_clip_s=20", "scenes: min_clip_s=20.0 must not exceed max_clip_s=10.0"),
        ("scenes.fps", "override 'scenes.fps' must look like section.key=value"),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_it(override, says):
    with pytest.raises(ConfigError) as error:
        load_build_config(CONFIGS / "demo.yaml", [override])
    message = str(error.value)
    assert message.startswith(f"{CONFIGS / 'demo.yaml'} (with --set {override}): ") and says in message
    assert "\n" not in message


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- scenes\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of sections, got list"):
        load_build_config(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="build config .*missing.yaml not found .see configs/dataset"):
        load_build_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--set", "scenes.fsp=30"], "scenes.fsp: unknown key"),
        (["--set", "images.backend=magic"], "images.backend: Input should be 'rembg' or 'classic'"),
        (["--config", "no/such.yaml"], "build config no/such.yaml not found"),
        (["--segmenter", "classic"], "--segmenter is gone: use --set segmentation.backend=classic"),
        (["--background-removal", "classic"], "--background-removal is gone: use --set images.backend=classic"),
    ],
)
def test_the_command_line_answers_a_bad_config_in_one_line(argv, says, tmp_path, capsys):
    output = tmp_path / "dataset"
    with pytest.raises(SystemExit) as stopped:
        main(["--source", str(tmp_path / "source"), "--output", str(output), *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and says in err
    assert err.strip().splitlines()[-1].count("error") == 1  # the message is the last line, whole
    assert not output.exists()  # refused before anything was built


def test_the_recorded_config_round_trips(tmp_path):
    root = DatasetRoot.create(tmp_path / "dataset")
    assert root.read_build_config() is None and recorded_build_config(root) is None
    cfg = load_build_config(CONFIGS / "tiny.yaml", ["segmentation.dilate_px=3"])
    root.write_build_config(cfg.model_dump(mode="json"))
    assert recorded_build_config(root) == cfg
    assert load_build_config(root.path("build.yaml")) == cfg  # build.yaml is a config file itself
    assert root.path("build.yaml").read_text().startswith("# build-dataset's config of this dataset root")


def test_a_root_builds_with_the_given_config_else_the_recorded_one_else_the_default(tmp_path):
    root = DatasetRoot.create(tmp_path / "dataset")
    assert resolve_build_config(root, None, default=DEFAULT_CONFIG) == BuildConfig()
    with pytest.raises(ConfigError, match="records no build config and no config was given"):
        resolve_build_config(root, None)
    tiny = load_build_config(CONFIGS / "tiny.yaml")
    root.write_build_config(tiny.model_dump(mode="json"))
    assert resolve_build_config(root, None, default=DEFAULT_CONFIG) == tiny
    assert resolve_build_config(root, None, ["masking.crf=20"], default=DEFAULT_CONFIG).masking.crf == 20
    assert resolve_build_config(root, str(CONFIGS / "demo.yaml"), default=DEFAULT_CONFIG).name == "demo"
    given = tiny.model_copy(update={"name": "given"})
    assert resolve_build_config(root, given) is given
    with pytest.raises(ConfigError, match="build config 'given' .with --set masking.crf=x.: masking.crf: Input"):
        resolve_build_config(root, given, ["masking.crf=x"])


def test_a_rebuild_with_another_config_reruns_the_changed_stages_and_those_after():
    tiny = load_build_config(CONFIGS / "tiny.yaml")

    def plan(*overrides, has_dataset=True):
        return rebuild_plan(tiny, load_build_config(CONFIGS / "tiny.yaml", list(overrides)), has_dataset)

    assert plan() == {"changes": [], "rerun": set()}
    assert plan("name=renamed") == {"changes": [], "rerun": set()}  # a name is not a setting
    assert plan("scenes.crf=20") == {"changes": ["scenes.crf: 18 -> 20"], "rerun": {"scenes", "segment", "masking"}}
    assert plan("segmentation.dilate_px=2")["rerun"] == {"segment", "masking"}
    assert plan("masking.fill=noise")["rerun"] == {"masking"}
    assert plan("images.size=256")["rerun"] == {"product_images"}
    assert rebuild_plan(None, tiny, has_dataset=True) == {"changes": [], "rerun": set()}  # built before roots recorded
    # Splits are sticky: a new seed or new shares would not move the products already assigned.
    with pytest.raises(ConfigError, match=r"splits cannot change on a built dataset \(splits.seed: 20260123 -> 1\)"):
        plan("splits.seed=1")
    assert plan("splits.seed=1", has_dataset=False)["changes"] == ["splits.seed: 20260123 -> 1"]


def test_the_command_line_refuses_a_splits_change_on_a_built_root(tmp_path, capsys):
    root = DatasetRoot.create(tmp_path / "dataset")
    root.write_build_config(load_build_config(CONFIGS / "tiny.yaml").model_dump(mode="json"))
    root.write_manifest("dataset", [])
    with pytest.raises(SystemExit) as stopped:
        main(["--source", str(tmp_path / "source"), "--output", str(root.root), "--set", "splits.ratios=[0.8,0.1,0.1]"])
    assert stopped.value.code == 2 and "splits cannot change on a built dataset" in capsys.readouterr().err
