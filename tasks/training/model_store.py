"""Model folders: what a training run logs to MLflow as artifact `model`, and what registry
versions point to.

```
<model folder>/
  run_config.yaml     the resolved RunConfig the model was trained with
  generator/          the backend's save (models/spec.py), e.g. transformer/ (+ product_encoder/);
                      a stage-1-only run saves the adapter (transformer/adapter_config.json)
  model_card.json     stage reached, step, dataset root, base model, adapter_only, ...
```

The base Wan components (VAE, UMT5, CLIP, and the DiT under an adapter) come from the run
config's `model.base_model` / `model.image_encoder`, so a folder downloaded from MLflow on
another machine loads wherever those resolve. `base_model: tiny` (CPU tests, demo) resolves to
random tiny components materialised once under `<data_dir>/models/tiny` (they are seeded, so
every machine builds the same weights).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from models.config import LEGACY_STEP_CACHE_KEY, TINY, ModelConfig
from models.spec import specification
from models.speed import StepCache
from models.tiny import save_tiny, tiny_folder_name
from storage.layout import DatasetRoot
from storage.tracking import ModelNotFoundError, resolve_model_uri
from tasks.training.run_config import RunConfig, load_run_config, run_config_from_dict

RUN_CONFIG_NAME = "run_config.yaml"
GENERATOR_DIR = "generator"
MODEL_CARD_NAME = "model_card.json"

# ModelConfig fields that decide the generator's weights: two configs that differ here cannot
# share a checkpoint. (Sampler and objective settings can change freely.)
ARCHITECTURE_FIELDS = (
    "backend",
    "base_model",
    "image_encoder",
    "reference",
    "reference_attention",
    "reference_lora_rank",
    "num_product_tokens",
    "product_hidden_dim",
    "product_num_heads",
    "inject_layers",
    "product_attention_heads",
    "mask_packing",
)


# `base:<run config YAML>` names the model a run config describes before any training: zero-shot
# VACE (its LoRA at zero), or the product backend with its new layers at zero. Evaluate and
# generate take it wherever they take a model URI, so a base can be scored before training.
BASE_PREFIX = "base:"


class IncompatibleCheckpointError(ValueError):
    """A checkpoint / model folder does not belong to the config it is loaded with."""


def resolve_model_config(cfg: ModelConfig, data_dir: str | Path = "data") -> ModelConfig:
    """`base_model: tiny` -> the backend's tiny components under <data_dir>/models/tiny[-vace]
    (built once, atomically); any other config is returned unchanged."""
    if cfg.base_model != TINY:
        return cfg
    models_dir = DatasetRoot.create(Path(data_dir) / "models")
    name = tiny_folder_name(cfg.backend)
    folder = models_dir.path(name)
    if not folder.is_dir():
        with models_dir.atomic_dir(name) as tmp:
            save_tiny(tmp, cfg.backend)
    return cfg.model_copy(update={"base_model": str(folder), "image_encoder": str(folder)})


def check_compatible(found: ModelConfig, expected: ModelConfig, where: str) -> None:
    """Raise IncompatibleCheckpointError naming every architecture field that differs."""
    differences = [
        f"{name}: checkpoint {getattr(found, name)!r} vs config {getattr(expected, name)!r}"
        for name in ARCHITECTURE_FIELDS
        if getattr(found, name) != getattr(expected, name)
    ]
    if differences:
        raise IncompatibleCheckpointError(
            f"{where} was trained with another model config ({'; '.join(differences)}): use a "
            "checkpoint trained with this config, or change the config to match it"
        )


def save_model_folder(
    folder: str | Path, generator: torch.nn.Module, run_config: RunConfig, adapter_only: bool, info: dict | None = None
) -> Path:
    """Write the model folder atomically (it appears complete or not at all) and return it.

    adapter_only: save only the new transformer weights (stage-1 runs: megabytes instead of the
    whole DiT). info: extra model-card entries (stage, step, dataset_root, run_id, ...).
    """
    folder = Path(folder).resolve()
    card = {
        "base_model": run_config.model.base_model,
        "adapter_only": adapter_only,
        "config_fingerprint": run_config.fingerprint(),
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(info or {}),
    }
    parent = DatasetRoot.create(folder.parent)
    with parent.atomic_dir(folder.name) as tmp:
        specification(run_config.model).save_generator(generator, tmp / GENERATOR_DIR, adapter_only)
        (tmp / RUN_CONFIG_NAME).write_text(run_config.to_yaml())
        (tmp / MODEL_CARD_NAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
    return folder


def read_model_card(folder: str | Path) -> dict:
    return json.loads((Path(folder) / MODEL_CARD_NAME).read_text())


def read_run_config(folder: str | Path) -> RunConfig:
    path = Path(folder) / RUN_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder (no {RUN_CONFIG_NAME}); "
            "pass a folder saved by the train flow or a runs:/ / models:/ URI"
        )
    data = yaml.safe_load(path.read_text())
    # Folders saved before step caches were calibrated per model say step_cache_threshold: 0.2
    # (the default then): read without it, the model generates every step (models/config.py).
    sampler = (data.get("model") or {}).get("sampler") if isinstance(data, dict) else None
    if isinstance(sampler, dict):
        sampler.pop(LEGACY_STEP_CACHE_KEY, None)
    return run_config_from_dict(data)


def is_base_model(uri: str | Path) -> bool:
    return str(uri).startswith(BASE_PREFIX)


def base_model(uri: str, torch_dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, RunConfig]:
    """(untrained generator, run config) of `base:<run config>`, new weights seeded by train.seed."""
    try:
        run_config = load_run_config(uri[len(BASE_PREFIX) :])
    except (FileNotFoundError, ValueError) as error:
        raise ModelNotFoundError(f"{uri} names no usable run config: {error}") from error
    cfg = resolve_model_config(run_config.model, run_config.mlflow.data_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_config.train.seed)
        return specification(cfg).build_generator(torch_dtype), run_config


def resolve_model(uri: str | Path, scratch: str | Path) -> Path:
    """A local model folder for any model URI; `base:` models are written (as an adapter folder:
    the base itself is read from the run config's model) under `scratch`."""
    if not is_base_model(uri):
        return resolve_model_uri(str(uri), scratch)
    generator, run_config = base_model(str(uri))
    return save_model_folder(
        Path(scratch) / "base", generator, run_config, adapter_only=True, info={"stage": "base", "step": 0}
    )


def load_model_folder(
    folder_or_uri: str | Path,
    torch_dtype: torch.dtype | None = None,
    expect: ModelConfig | None = None,
    data_dir: str | Path | None = None,
) -> tuple[torch.nn.Module, RunConfig]:
    """(generator, run config) from a model folder, `runs:/<id>/model`, `models:/<name>@<alias>`
    or `base:<run config>` (BASE_PREFIX).

    expect: the model config the caller will use the generator with (fine-tuning, evaluation);
    a folder trained with different architecture fields raises IncompatibleCheckpointError.
    data_dir: where `tiny` components live (default: the folder's own run config's mlflow.data_dir).
    """
    if is_base_model(folder_or_uri):
        generator, run_config = base_model(str(folder_or_uri), torch_dtype)
        if expect is not None:
            check_compatible(run_config.model, expect, str(folder_or_uri))
        return generator, run_config
    folder = resolve_model_uri(str(folder_or_uri))
    run_config = read_run_config(folder)
    if expect is not None:
        check_compatible(run_config.model, expect, f"model folder {folder}")
    cfg = resolve_model_config(run_config.model, data_dir or run_config.mlflow.data_dir)
    generator_dir = folder / GENERATOR_DIR
    try:
        generator = specification(cfg).load_generator(generator_dir, torch_dtype=torch_dtype)
    except (RuntimeError, OSError, ValueError) as error:
        raise IncompatibleCheckpointError(
            f"cannot load the generator in {generator_dir} as its {RUN_CONFIG_NAME} describes it: {error}"
        ) from error
    return generator, run_config


def load_pipeline(
    folder_or_uri: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    data_dir: str | Path | None = None,
    plain: bool = False,
    step_cache: StepCache | None = None,
    steps: int | None = None,
):
    """(ProductVideoPipeline on `device`, RunConfig): the generator of the model folder with the
    frozen components (VAE in float32, UMT5, CLIP, scheduler) of its run config's base model,
    compiled as the config's model.sampler says. Every step is computed unless `step_cache` (a
    calibrated one, for calls of `steps` steps: default the calibrated count) is given. With
    `plain` the returned config's sampler is SamplerConfig.plain(): diffusers' plain path."""
    generator, run_config = load_model_folder(folder_or_uri, torch_dtype=dtype, data_dir=data_dir)
    if plain:
        model = run_config.model.model_copy(update={"sampler": run_config.model.sampler.plain()})
        run_config = run_config.model_copy(update={"model": model})
    cfg = resolve_model_config(run_config.model, data_dir or run_config.mlflow.data_dir)
    spec = specification(cfg)
    pipe = spec.pipeline(generator, dtype).to(device)
    sampler = run_config.model.sampler
    spec.speed_up_generation(pipe, sampler.compile, None, device)
    if step_cache is not None:
        spec.enable_step_cache(pipe, step_cache, steps)
    return pipe, run_config
