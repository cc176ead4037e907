"""One YAML per run (torchtune style): model, data, precompute, train, evaluate, registry, mlflow.

`load_run_config("configs/tiny.yaml", ["train.stage1.max_steps=3", "data.frames=5"])` reads the
file, applies dotted `key=value` overrides (values parsed as YAML, so `3` is an int, `null` is
None, `[0.9,0.99]` a list) and validates the whole tree; an unknown key or a bad value is a
one-line error naming it (storage/config_files.py, shared with build-dataset's config). The
resolved config is what MLflow logs as params and what a model folder stores as run_config.yaml,
so a model can always be rebuilt the way it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.config import ModelConfig, load_model_config
from models.metrics import MetricNetworks
from models.transformer import SPATIAL_FACTOR, TEMPORAL_FACTOR
from storage.config_files import apply_override, read_mapping, validate_config  # noqa: F401 (apply_override: API)
from storage.hashing import sha256_json
from storage.tracking import MODEL_NAME
from tasks.training.report import ReportThresholds

# The DiT patchifies latents 2x2, so pixels must be multiples of 8 (VAE) x 2 (patch).
PIXEL_MULTIPLE = SPATIAL_FACTOR * 2


# Keys that change how fast a run trains or samples, not what it trains (the guidance options
# came after runs were named by this fingerprint: left out, an older run keeps its name).
SPEED_ONLY_KEYS = {
    "train": {"distributed", "gradient_checkpointing", "attention", "compile"},
    "model": {"sampler": {"attention", "compile", "guidance_interval", "joint_guidance_scale"}},
    "evaluate": {"calibration"},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """Which dataset and what one training sample is.

    A sample is a window of `frames` frames taken from the start of each clip every
    `frame_stride`-th frame, resized (stretched) to height x width; clips too short for the
    window are left out by precompute with a reason.
    """

    root: str = "data/demo/dataset"  # a build-dataset output (manifests/dataset.parquet)
    frames: int = Field(49, ge=1)  # 4k+1 (Wan VAE folds 4 frames per latent frame, the first alone)
    frame_stride: int = Field(1, ge=1)
    height: int = Field(480, ge=PIXEL_MULTIPLE)
    width: int = Field(720, ge=PIXEL_MULTIPLE)
    max_product_images: int = Field(4, ge=1)  # the first N photos of a product (seed: 4)
    # Sample windows per clip, spread evenly over it (tasks/training/precompute.py): the frames build-dataset
    # segmented are frames trained on. Evaluation and sample videos use the first window.
    windows_per_clip: int = Field(1, ge=1)
    # The text prompt: the dataset's caption, or its category word alone (a caption that names the
    # product's colours tells a model without photos what the photos would, docs/poc.md).
    prompt_from: Literal["caption", "category"] = "caption"

    @field_validator("frames")
    @classmethod
    def _frames_fold(cls, value: int) -> int:
        if (value - 1) % TEMPORAL_FACTOR:
            raise ValueError(f"frames must be 4k+1 (Wan's VAE folds 4 frames per latent frame), got {value}")
        return value

    @field_validator("height", "width")
    @classmethod
    def _multiple(cls, value: int) -> int:
        if value % PIXEL_MULTIPLE:
            raise ValueError(f"height and width must be multiples of {PIXEL_MULTIPLE}, got {value}")
        return value


class PrecomputeConfig(_Section):
    """Where the frozen encoders (VAE, UMT5, CLIP) run when latents are precomputed."""

    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # text/image encoders; the VAE stays fp32


class StageConfig(_Section):
    """One training stage (seed 4.1). Steps are optimizer steps (after gradient accumulation);
    `max_steps` caps the stage even when `epochs` would run longer. `trains` names what it trains
    (models.spec.STAGE_NAMES: adapter, full, scratch); unset, stage 1 trains the adapter and
    stage 2 the full DiT."""

    trains: Literal["adapter", "full", "scratch"] | None = None
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    # Clips per micro-batch over all ranks: a torchrun launch splits each micro-batch across its
    # ranks, so the same config trains the same steps on any number of GPUs.
    batch_size: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    grad_accum: int = Field(1, ge=1)


class OptimizerConfig(_Section):
    """AdamW, seed 4.3."""

    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None = no clipping


class DistributedConfig(_Section):
    """Training on several GPUs of one host (docs/distributed.md).

    nproc_per_node 1 with ddp trains in the train flow's own process (no process group); more
    processes, or fsdp, make the flow start torchrun with one process per GPU. Activation
    checkpointing is `train.gradient_checkpointing` (per Wan block) under every strategy.
    """

    nproc_per_node: int = Field(1, ge=1)  # processes (GPUs) on this host
    # ddp: every rank holds the whole model, gradients are all-reduced (1.3B).
    # fsdp: FSDP2 shards weights, gradients and optimizer state per Wan block (14B).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU

    @property
    def uses_torchrun(self) -> bool:
        return self.nproc_per_node > 1 or self.strategy == "fsdp"


class TrainConfig(_Section):
    stage1: StageConfig = StageConfig(epochs=50, batch_size=4, learning_rate=1e-4)
    stage2: StageConfig | None = StageConfig(epochs=100, batch_size=2, learning_rate=1e-5)  # None: adapter only
    optimizer: OptimizerConfig = OptimizerConfig()
    # Each stage has its own optimizer and schedule: linear warm-up, then cosine to 0.
    warmup_steps: int = Field(1000, ge=0)
    bf16: bool = True  # autocast to bfloat16 on CUDA (weights and optimizer stay float32); CPU runs float32
    # Speed (models/speed.py, docs/performance.md); none of these changes what is trained. The plain
    # diffusers path is gradient_checkpointing: full, attention: default, compile: false.
    # selective: keep attention outputs, recompute the rest; full: recompute whole Wan blocks.
    gradient_checkpointing: Literal["selective", "full", "none"] = "selective"
    attention: Literal["cudnn", "default"] = "cudnn"  # cuDNN's fused attention first (CUDA)
    compile: bool = True  # torch.compile the (checkpointed) Wan blocks (CUDA only)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # None = no EMA; the saved model is the EMA when set
    checkpoint_every: int = Field(500, ge=1)  # optimizer steps
    sample_every_epoch: int = Field(1, ge=0)  # sample video + contact sheet every N epochs, 0 = never
    sample_steps: int | None = Field(None, ge=1)  # sampler steps of those samples (None: model.sampler's)
    num_samples: int = Field(2, ge=1)  # clips in the fixed validation batch
    seed: int = 0
    device: str = "auto"
    runs_dir: str = "data/runs"
    # Run folder name under runs_dir; None = "<config name>-<hash of config + data + init>", so the
    # same run started again resumes, and a changed config starts a new run.
    run_name: str | None = None
    distributed: DistributedConfig = DistributedConfig()

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _boolean_means_diffusers(cls, value):
        # Configs written before the choice existed say true (diffusers' full checkpointing) or false.
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _every_rank_gets_clips(self) -> TrainConfig:
        ranks = self.distributed.nproc_per_node
        for name, stage in (("stage1", self.stage1), ("stage2", self.stage2)):
            if stage is not None and stage.batch_size < ranks:
                raise ValueError(
                    f"train.{name}.batch_size {stage.batch_size} is smaller than "
                    f"train.distributed.nproc_per_node {ranks}: each micro-batch is split across "
                    "the ranks, so some would have no clip; raise the batch size (and lower "
                    "grad_accum to keep the effective batch) or use fewer processes"
                )
        return self


class CalibrationConfig(_Section):
    """Step-cache calibration of the evaluated model (tasks/training/calibration.py): its first
    `clips` clips of the evaluated split generated exact, then with each step cache at each
    threshold; the largest threshold whose mask-region PSNR (against the real clips, the primary
    metric) moves by at most max_psnr_change_db, with at least min_speedup, is recorded on the
    model's registry version for `generate --fast`. Off unless enabled (or evaluate --calibrate)."""

    enabled: bool = False
    clips: int = Field(4, ge=1)
    # Thresholds of diffusers' First Block Cache (relative change of the first block's output)
    # and MagCache (accumulated error predicted from the model's magnitude ratios); [] = not tried.
    first_block_cache: list[float] = [0.05, 0.1, 0.2, 0.3]
    mag_cache: list[float] = [0.02, 0.04, 0.06, 0.12]
    max_psnr_change_db: float = Field(0.3, gt=0)
    min_speedup: float = Field(1.05, ge=0)

    @field_validator("first_block_cache", "mag_cache")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(threshold <= 0 for threshold in value):
            raise ValueError(f"step cache thresholds must be positive, got {value}")
        return sorted(set(value))


class EvaluateConfig(_Section):
    split: str = "test"
    num_inference_steps: int = Field(50, ge=1)
    text_guidance_scale: float = 5.0
    product_guidance_scale: float = 3.0
    seed: int = 0
    max_clips: int | None = Field(None, ge=1)  # None = the whole split
    networks: MetricNetworks = MetricNetworks()
    primary_metric: str = "psnr_mask"
    higher_is_better: bool = True
    thresholds: ReportThresholds = ReportThresholds()
    calibration: CalibrationConfig = CalibrationConfig()


class RegistryConfig(_Section):
    model_name: str = MODEL_NAME
    promote: bool = True


class MlflowConfig(_Section):
    experiment: str = "product-video-generator"
    data_dir: str = "data"  # local SQLite store under <data_dir>/mlflow when MLFLOW_TRACKING_URI is unset
    log_system_metrics: bool = True


class RunConfig(_Section):
    name: str = "run"  # config name (the YAML's stem unless set); prefixes run folders
    model: ModelConfig
    data: DataConfig = DataConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _images_fit_model(self) -> RunConfig:
        if self.data.max_product_images > self.model.max_product_images:
            raise ValueError(
                f"data.max_product_images ({self.data.max_product_images}) exceeds "
                f"model.max_product_images ({self.model.max_product_images})"
            )
        return self

    def fingerprint(self) -> str:
        """Content hash of the resolved config (names a run, checks a checkpoint belongs to it).
        Left out, as they do not change what is trained: train.distributed (the batch is global, so a
        run can resume on another number of GPUs) and the speed settings (a run can resume on the
        plain path)."""
        return sha256_json(self.model_dump(mode="json", exclude=SPEED_ONLY_KEYS))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def prompt_of(row: dict, prompt_from: str) -> str:
    """The text prompt of a dataset row (DataConfig.prompt_from)."""
    return row["category"] if prompt_from == "category" else row["caption"]


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"stage1": {"epochs": 1}}} -> {"train.stage1.epochs": 1} (for MLflow params)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def run_config_from_dict(data: dict, overrides: list[str] = ()) -> RunConfig:
    return validate_config(RunConfig, data, overrides, where="run config")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run YAML, apply dotted overrides, validate; errors name the file and the key.

    `model:` is either the model section itself or the path of a configs/model/*.yaml file
    (relative to the run YAML's folder), so run configs share model definitions.
    """
    path = Path(path)
    data = read_mapping(path, "run config", "see configs/*.yaml")
    data.setdefault("name", path.stem)
    if isinstance(data.get("model"), str):
        model_path = path.parent / data["model"]
        if not model_path.is_file():
            raise FileNotFoundError(f"{path}: model config {model_path} not found")
        data["model"] = load_model_config(model_path).model_dump(mode="json")
    return validate_config(RunConfig, data, list(overrides), where=str(path))


def resolve_run_config(config: str | Path | RunConfig, overrides: list[str] = ()) -> RunConfig:
    """A run config given as a YAML path (read once, see load_run_config) or as a validated
    RunConfig (a caller that already read it: retrain), with dotted `overrides` applied."""
    if isinstance(config, RunConfig):
        return run_config_from_dict(config.model_dump(mode="json"), list(overrides)) if overrides else config
    return load_run_config(config, overrides)
