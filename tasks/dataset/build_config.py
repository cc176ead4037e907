"""build-dataset's config: one YAML per build (configs/dataset/*.yaml), recorded in the dataset.

    python -m flows.build_dataset --source S --output OUT --config configs/dataset/demo.yaml \\
        --set scenes.max_clip_s=8 --set segmentation.dilate_px=2

`load_build_config(path, overrides)` reads the file, applies dotted `key=value` overrides and
validates the whole tree with the run config's machinery (storage/config_files.py): an unknown
key or a bad value is a one-line error naming it. Keys a file leaves out take the code's
defaults, which configs/dataset/default.yaml spells out (a test keeps the two equal).

The dataset remembers how it was built: the resolved config is recorded in the root as
`build.yaml` (storage/layout.py) before any stage runs, and it is the default config of the next
build of that root (retrain refreshes a dataset with it). A rebuild with another config
(`rebuild_plan`): the stages whose section changed, and the stages after them, run every item
again instead of trusting their cache, because the files under the root are the recorded
config's (a cache entry of an older config may name files a later config has overwritten);
`splits` cannot change once a root has a dataset (splits are sticky: existing products would keep
the old assignment while build.yaml claimed the new one).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from storage.config_files import ConfigError, read_mapping, validate_config
from storage.layout import DatasetRoot
from tasks.dataset.assemble import SplitConfig
from tasks.dataset.masking import MaskConfig
from tasks.dataset.product_images import ImageConfig
from tasks.dataset.scenes import SceneConfig
from tasks.dataset.segment import SegmentConfig

# A changed section re-runs these stages (its own and those after it: their inputs are its outputs).
SECTION_STAGES = {
    "scenes": ("scenes", "segment", "masking"),
    "segmentation": ("segment", "masking"),
    "masking": ("masking",),
    "images": ("product_images",),
    "splits": (),  # assemble, which is not cached
}


class BuildConfig(BaseModel):
    """Every option of build-dataset besides its source and output, one section per stage."""

    model_config = ConfigDict(extra="forbid")

    name: str = "default"  # the YAML's stem unless set
    scenes: SceneConfig = SceneConfig()
    segmentation: SegmentConfig = SegmentConfig()
    masking: MaskConfig = MaskConfig()
    images: ImageConfig = ImageConfig()
    splits: SplitConfig = SplitConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_build_config(path: str | Path, overrides: list[str] = ()) -> BuildConfig:
    """Read a build YAML, apply dotted overrides, validate; errors are one line naming the key."""
    path = Path(path)
    data = read_mapping(path, "build config", "see configs/dataset/*.yaml")
    data.setdefault("name", path.stem)
    return validate_config(BuildConfig, data, overrides, where=str(path))


def recorded_build_config(root: DatasetRoot) -> BuildConfig | None:
    """The config the root was last built with (its build.yaml); None when it records none."""
    data = root.read_build_config()
    if data is None:
        return None
    return validate_config(BuildConfig, data, where=f"{root.path(root.build_config_rel)} (the recorded build config)")


def resolve_build_config(
    root: DatasetRoot,
    config: str | Path | BuildConfig | None,
    overrides: list[str] = (),
    default: str | Path | None = None,
) -> BuildConfig:
    """The config of a build of `root`: `config` (a YAML path or a validated BuildConfig) or, when
    None, the root's recorded build.yaml, else the `default` file; with `overrides` applied."""
    if config is None:
        config = recorded_build_config(root)
        if config is None:
            if default is None:
                raise ConfigError(f"{root.root} records no build config and no config was given")
            config = default
    if isinstance(config, BuildConfig):
        if not overrides:
            return config
        return validate_config(
            BuildConfig, config.model_dump(mode="json"), overrides, where=f"build config {config.name!r}"
        )
    return load_build_config(config, overrides)


def differences(old: BuildConfig, new: BuildConfig) -> list[str]:
    """`section.key: old -> new` for every setting that differs (the name is not a setting)."""
    a, b = old.model_dump(mode="json", exclude={"name"}), new.model_dump(mode="json", exclude={"name"})
    return [
        f"{section}.{key}: {a[section].get(key)!r} -> {b[section].get(key)!r}"
        for section in b
        for key in sorted(set(a[section]) | set(b[section]))
        if a[section].get(key) != b[section].get(key)
    ]


def rebuild_plan(recorded: BuildConfig | None, new: BuildConfig, has_dataset: bool) -> dict:
    """What a build of a root that records `recorded` does with `new`:
    {"changes": differences, "rerun": stages that must not trust their cache}. A `splits` change
    on a root with a dataset is a ConfigError."""
    if recorded is None:
        return {"changes": [], "rerun": set()}
    changes = differences(recorded, new)
    changed = {line.split(".", 1)[0] for line in changes}
    if "splits" in changed and has_dataset:
        raise ConfigError(
            f"splits cannot change on a built dataset ({'; '.join(c for c in changes if c.startswith('splits.'))}): "
            "splits are sticky, its products would keep their old split; keep the recorded splits "
            "(build.yaml in the output) or build into a new output"
        )
    return {"changes": changes, "rerun": {stage for section in changed for stage in SECTION_STAGES[section]}}
