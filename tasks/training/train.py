"""The training loop as plain functions: stage 1 then stage 2 (seed section 4), each training what
its `trains` names: the adapter, the DiT too, or every weight from scratch (models/spec.py).

Reads only precomputed latents (tasks/training/precompute.py). Per stage: AdamW on the stage's trainable
weights (fused on CUDA), linear warm-up then cosine decay (diffusers' schedule), bf16 autocast on
CUDA (float32 on CPU: CPU bf16 autocast is slow and the tests compare numbers), gradient
accumulation, activation checkpointing and compilation of the Wan blocks (models/speed.py),
optional EMA (diffusers' EMAModel; at the end of a stage its weights replace the raw ones, so
stage 2 starts from stage 1's EMA).

Steps are optimizer steps, counted globally across stages (stage 2 continues stage 1's count).

Determinism, which makes a killed run resume onto the same loss curve:
- the batch order of an epoch is a permutation drawn from (seed, stage, epoch) alone;
- the noise, timesteps and condition dropout of a micro-batch come from a generator seeded with
  (seed, stage, step, micro-batch), not from a global RNG stream;
so a run resumed from step s sees exactly the batches and noise the uninterrupted run saw.

On several GPUs (train.distributed, docs/distributed.md) torchrun runs this same loop on every
rank: each micro-batch is global and every rank trains its rows of it (tasks/training/distributed.py), so
the run is the same run whatever the number of GPUs, and resumes on another number.

Run folder `<train.runs_dir>/<run name>/`:
```
run.json                          MLflow run id, config fingerprint, status
checkpoints/step-000042/          one process: trainable.safetensors (this stage's trainable weights,
                                  float32), state.pt (optimizer, scheduler, EMA, torch RNG), meta.json;
                                  torchrun ranks: a DCP folder (.metadata, __<rank>_0.distcp) + meta.json
model/                            the final model folder (tasks/training/model_store.py), also MLflow artifact `model`
```
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from models import speed
from models.objective import banded_losses, draw_noise, loss_parts
from models.spec import ModelSpecification, set_trainable, specification
from storage.hashing import sha256_json
from storage.images import save_png
from storage.layout import DatasetRoot
from storage.tracking import resolve_model_uri, setup_mlflow
from storage.video import write_video
from tasks.training.distributed import (
    World,
    gather_model,
    is_sharded,
    is_sharded_checkpoint,
    joined_world,
    load_sharded,
    prepare_model,
    save_sharded,
    shared_atomic_dir,
    stage_module,
)
from tasks.training.model_store import (
    IncompatibleCheckpointError,
    load_model_folder,
    read_model_card,
    resolve_model_config,
    save_model_folder,
)
from tasks.training.precompute import (
    LatentsError,
    LatentSpec,
    check_latents,
    load_clip_window,
    load_latents,
    load_product_photos,
)
from tasks.training.run_config import RunConfig, StageConfig, flatten, prompt_of

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
META_FILE = "meta.json"
MODEL_DIR = "model"
TRAIN_SPLIT, VAL_SPLIT = "train", "val"


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says what to do."""


# -- data -------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """The train split's latents rows (one per clip window, sorted by clip key and window), the
    dataset root, and the model specification that stacks them into batches."""

    root: DatasetRoot
    rows: list[dict]
    spec: ModelSpecification

    @classmethod
    def load(cls, cfg: RunConfig, split: str = TRAIN_SPLIT) -> TrainData:
        """Rows of `split` for this config's latents signature; every file checked (header and
        shapes), so missing or corrupt latents fail here, naming the file, not mid-run."""
        root = DatasetRoot(Path(cfg.data.root).expanduser().resolve())
        if not root.has_manifest("latents"):
            raise LatentsError(
                f"{root.root} has no manifests/latents.parquet: run precompute first "
                "(the train flow does it before training)"
            )
        signature = LatentSpec.from_run_config(cfg).signature
        rows = sorted(
            (
                row
                for row in root.read_manifest("latents").to_pylist()
                if row["signature"] == signature and row["split"] == split
            ),
            key=lambda r: (r["clip_key"], r["window"]),
        )
        if not rows:
            raise TrainingError(
                f"the {split} split of {root.root} has no precomputed clips (signature {signature}): "
                "build a dataset with products in that split, or check the precompute rejects"
            )
        for row in rows:
            check_latents(root, row)
        return cls(root, rows, specification(resolve_model_config(cfg.model, cfg.mlflow.data_dir)))

    def micro_batches(self, seed: int, stage: int, epoch: int, batch_size: int) -> list[list[int]]:
        """The epoch's batches: a permutation drawn from (seed, stage, epoch) only, cut into
        batches (the last may be smaller)."""
        order = torch.randperm(
            len(self.rows), generator=torch.Generator().manual_seed(_derive_seed(seed, "order", stage, epoch))
        ).tolist()
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def batch(self, indices: list[int], device: torch.device, images: int | None = None) -> dict[str, torch.Tensor]:
        batch = self.spec.collate([load_latents(self.root, self.rows[i]) for i in indices], images)
        return {name: value.to(device) for name, value in batch.items()}

    def share(self, indices: list[int], world: World, device: torch.device) -> RankShare:
        """This rank's part of the global micro-batch `indices`, padded to the photo count of the
        whole micro-batch (so every rank's tensors are the rows one process would stack)."""
        rows, weight = world.rows(len(indices)), 1.0
        if rows.start == rows.stop:  # fewer clips than ranks (an epoch's last micro-batch)
            rows, weight = slice(0, 1), 0.0
        images = max(self.rows[i]["num_images"] for i in indices)
        return RankShare(self.batch(indices[rows], device, images), rows, len(indices), weight)


@dataclass
class RankShare:
    """The rows of one global micro-batch that this rank trains on."""

    batch: dict[str, torch.Tensor]
    rows: slice  # their place in the micro-batch (noise is drawn for all rows, then sliced)
    global_size: int
    # 0 for a rank left without clips: it runs the first clip with weight 0, so that it still
    # takes part in every collective (DDP's all-reduce, FSDP's all-gathers) and adds nothing.
    weight: float


def _derive_seed(*parts) -> int:
    return int(sha256_json(list(parts))[:15], 16)


# -- plan, optimizer, one step ----------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    stage: int
    trains: str  # models.spec.STAGE_NAMES
    config: StageConfig
    steps_per_epoch: int
    total_steps: int
    first_global_step: int  # global step count before this stage


def plan_stages(cfg: RunConfig, num_clips: int) -> list[StagePlan]:
    plans, done = [], 0
    for stage, stage_cfg, trains in ((1, cfg.train.stage1, "adapter"), (2, cfg.train.stage2, "full")):
        if stage_cfg is None:
            continue
        batches = math.ceil(num_clips / stage_cfg.batch_size)
        steps_per_epoch = math.ceil(batches / stage_cfg.grad_accum)
        total = stage_cfg.epochs * steps_per_epoch
        if stage_cfg.max_steps is not None:
            total = min(total, stage_cfg.max_steps)
        plans.append(StagePlan(stage, stage_cfg.trains or trains, stage_cfg, steps_per_epoch, total, done))
        done += total
    return plans


def build_optimizer(
    model: torch.nn.Module, trainable: set[str], cfg: RunConfig, stage_cfg: StageConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the stage's trainable weights (seed 4.3 betas / weight decay); fused on CUDA."""
    params = [p for name, p in model.named_parameters() if name in trainable]
    opt = cfg.train.optimizer
    return torch.optim.AdamW(
        params,
        lr=stage_cfg.learning_rate,
        betas=opt.betas,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        fused=device.type == "cuda",
    )


def build_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up over min(warmup_steps, total) steps, then cosine to 0 at the stage's end."""
    return get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total_steps), total_steps)


def train_step(
    spec: ModelSpecification,
    model: torch.nn.Module,
    shares: list[RankShare],
    cfg: RunConfig,
    optimizer,
    scheduler,
    ema: EMAModel | None,
    seeds: list[int],
    world: World,
    device: torch.device,
) -> tuple[float, dict[str, float]]:
    """One optimizer step over len(shares) accumulated micro-batches; returns their mean loss and
    the mean of their diagnostics (objective.banded_losses of this rank's rows).

    seeds[i] seeds micro-batch i's noise / timesteps / dropout (see the module docstring). Each
    rank draws them for the whole micro-batch and keeps its rows, and divides its errors by the
    weight sums over all ranks: the ranks' parts add up to the loss one process computes.
    """
    optimizer.zero_grad(set_to_none=True)
    with speed.attention(cfg.train.attention, device):  # the backward pass too: it may recompute attention
        results = [
            accumulate_gradients(spec, model, share, seed, len(shares), cfg, world, device)
            for share, seed in zip(shares, seeds)
        ]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if cfg.train.optimizer.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.train.optimizer.max_grad_norm)
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.step(params)
    diagnostics = {}
    for name in {name for _, metrics in results for name in metrics}:
        diagnostics[name] = float(np.mean([metrics[name] for _, metrics in results if name in metrics]))
    return float(np.mean([loss for loss, _ in results])), diagnostics


def accumulate_gradients(
    spec: ModelSpecification,
    model: torch.nn.Module,
    share: RankShare,
    seed: int,
    micro_batches: int,
    cfg: RunConfig,
    world: World,
    device: torch.device,
) -> tuple[float, dict[str, float]]:
    """Forward and backward of one micro-batch (this rank's rows); returns its loss over all ranks
    and this rank's diagnostics."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16 and device.type == "cuda")
    objective = cfg.model.objective
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (share.global_size, *share.batch["latents"].shape[1:])
    draw = draw_noise(shape, objective, generator, device).rows(share.rows)
    with autocast:
        parts = loss_parts(spec, model, share.batch, draw, objective)
    part = (
        parts.loss(objective, world.sum(parts.flow_weight * share.weight), world.sum(parts.mask_weight * share.weight))
        * share.weight
    )
    loss = world.sum(part)
    if not torch.isfinite(loss):
        raise TrainingError(
            f"loss is {loss.item()}: training diverged; lower the learning rate "
            "(the last checkpoint is kept, resume after fixing the config)"
        )
    (part * world.size / micro_batches).backward()  # DDP and FSDP average gradients over the ranks
    return loss.item(), banded_losses(parts, draw.sigmas) if share.weight else {}


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:06d}"


def save_checkpoint(
    run_root: DatasetRoot,
    model: torch.nn.Module,
    trainable: set[str],
    optimizer,
    scheduler,
    ema: EMAModel | None,
    meta: dict,
) -> Path:
    """checkpoints/step-XXXXXX/ atomically: it appears complete or not at all."""
    rel = f"{CHECKPOINTS}/{checkpoint_name(meta['global_step'])}"
    with run_root.atomic_dir(rel) as tmp:
        weights = {
            name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if name in trainable
        }
        save_file(weights, str(tmp / "trainable.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "rng": rng,
            },
            tmp / "state.pt",
        )
        _write_meta(tmp, meta)
    return run_root.path(rel)


def _write_meta(folder: Path, meta: dict) -> None:
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_training_checkpoint(
    run_root: DatasetRoot,
    world: World,
    model: torch.nn.Module,
    trainable: set[str],
    optimizer,
    scheduler,
    ema: EMAModel | None,
    meta: dict,
) -> Path:
    """A single process writes save_checkpoint's files; the ranks of a torchrun launch write one
    DCP folder together (tasks/training/distributed.py), which loads on any number of ranks."""
    if not world.launched:
        return save_checkpoint(run_root, model, trainable, optimizer, scheduler, ema, meta)
    rel = f"{CHECKPOINTS}/{checkpoint_name(meta['global_step'])}"
    with shared_atomic_dir(run_root, rel, world) as tmp:
        save_sharded(tmp, model, optimizer, scheduler, ema)
        if world.is_main:
            _write_meta(tmp, meta)
    return run_root.path(rel)


def latest_checkpoint(run_dir: Path) -> Path | None:
    folders = sorted((run_dir / CHECKPOINTS).glob("step-[0-9]*")) if (run_dir / CHECKPOINTS).is_dir() else []
    return folders[-1] if folders else None


def read_checkpoint_meta(folder: Path, cfg: RunConfig) -> dict:
    """The checkpoint's meta, refused when it was written by another config."""
    meta = json.loads((folder / META_FILE).read_text())
    if meta["config_fingerprint"] != cfg.fingerprint():
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} was written by another run config (fingerprint "
            f"{meta['config_fingerprint'][:12]}, this config {cfg.fingerprint()[:12]}): resume it with the "
            "config it was trained with, or train with resume=False / another train.run_name"
        )
    return meta


def load_checkpoint_weights(folder: Path, model: torch.nn.Module) -> None:
    weights = load_file(str(folder / "trainable.safetensors"))
    missing = set(weights) - {name for name, _ in model.named_parameters()}
    if missing:
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} holds weights this model does not have: {sorted(missing)[:5]}"
        )
    model.load_state_dict(weights, strict=False)


def restore_state(folder: Path, optimizer, scheduler, ema: EMAModel | None) -> None:
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def resume_checkpoint(folder: Path, model: torch.nn.Module, optimizer, scheduler, ema: EMAModel | None) -> None:
    """Load either checkpoint format into the stage's model, optimizer, scheduler and EMA: a DCP
    folder on any number of ranks (one process included); a single process's files wherever the
    weights are whole (one process, DDP)."""
    if is_sharded_checkpoint(folder):
        load_sharded(folder, model, optimizer, scheduler, ema)
    elif is_sharded(model):
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} was written by a single process, and FSDP resumes only the sharded "
            "checkpoints of a torchrun launch: resume it with train.distributed.strategy=ddp, or start a new "
            "run (resume=False or another train.run_name)"
        )
    else:
        load_checkpoint_weights(folder, model)
        restore_state(folder, optimizer, scheduler, ema)


# -- samples ----------------------------------------------------------------------------------


@dataclass
class ValidationBatch:
    """A fixed set of clips (first `num_samples` of val, else of train) in pixel space."""

    masked_video: torch.Tensor  # (B, 3, T, H, W)
    mask: torch.Tensor  # (B, 1, T, H, W)
    video: torch.Tensor
    photos: list[list[np.ndarray]]
    captions: list[str]
    fps: float

    @classmethod
    def load(cls, cfg: RunConfig, data: TrainData) -> ValidationBatch:
        root = data.root
        latents = [
            r
            for r in root.read_manifest("latents").to_pylist()
            if r["signature"] == data.rows[0]["signature"] and r["split"] == VAL_SPLIT
        ]
        chosen = sorted({r["clip_key"] for r in (latents or data.rows)})[: cfg.train.num_samples]
        dataset = {r["clip_key"]: r for r in root.read_manifest("dataset").to_pylist()}
        d = cfg.data
        windows = [
            load_clip_window(
                root, dataset[k]["video_path"], dataset[k]["mask_dir"], d.frames, d.frame_stride, d.height, d.width
            )
            for k in chosen
        ]
        video = torch.stack([w[0] for w in windows])
        mask = torch.stack([w[1] for w in windows])
        return cls(
            masked_video=video * (1 - mask),
            mask=mask,
            video=video,
            photos=[load_product_photos(root, dataset[k]["product_images"], d.max_product_images) for k in chosen],
            captions=[prompt_of(dataset[k], d.prompt_from) for k in chosen],
            fps=dataset[chosen[0]]["fps"] / d.frame_stride,
        )


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [0, 1] -> (T, H, W, 3) uint8."""
    return (video.permute(1, 2, 3, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def sample_panels(batch: ValidationBatch, generated: torch.Tensor) -> np.ndarray:
    """(T, B*H, 3*W, 3): per clip, masked input | generated | original, clips stacked vertically."""
    rows = [
        np.concatenate([_to_uint8(batch.masked_video[i]), _to_uint8(generated[i]), _to_uint8(batch.video[i])], axis=2)
        for i in range(generated.shape[0])
    ]
    return np.concatenate(rows, axis=1)


def contact_sheet(panels: np.ndarray, columns: int = 5) -> np.ndarray:
    """Up to `columns` evenly spaced frames of the panel video side by side, separated by white."""
    frames = panels.shape[0]
    picks = np.unique(np.linspace(0, frames - 1, min(columns, frames)).round().astype(int))
    gap = np.full((panels.shape[1], 4, 3), 255, dtype=np.uint8)
    tiles = [part for i in picks for part in (panels[i], gap)][:-1]
    return np.concatenate(tiles, axis=1)


def generate_samples(pipeline, batch: ValidationBatch, cfg: RunConfig, device: torch.device) -> np.ndarray:
    """The validation batch generated, as sample_panels (every rank runs it: FSDP ranks compute
    the sharded model's forward together)."""
    steps = cfg.train.sample_steps or cfg.model.sampler.num_inference_steps
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16 and device.type == "cuda")
    with autocast:
        generated = pipeline(
            batch.masked_video,
            batch.mask,
            batch.photos,
            batch.captions,
            num_inference_steps=steps,
            text_guidance_scale=cfg.model.sampler.text_guidance_scale,
            product_guidance_scale=cfg.model.sampler.product_guidance_scale,
            generator=torch.Generator(device=device).manual_seed(cfg.train.seed),
            attention_backend=cfg.model.sampler.attention,
            **cfg.model.sampler.guidance_options(),
        )
    return sample_panels(batch, generated.float().cpu())


def log_samples(panels: np.ndarray, fps: float, label: str, out_dir: Path) -> None:
    """Write `<label>.mp4` and `<label>.png` (contact sheet), log both to MLflow."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_video(out_dir / f"{label}.mp4", list(panels), fps)
    save_png(out_dir / f"{label}.png", contact_sheet(panels))
    mlflow.log_artifact(str(out_dir / f"{label}.mp4"), "samples")
    mlflow.log_artifact(str(out_dir / f"{label}.png"), "samples")


# -- the run ----------------------------------------------------------------------------------


def gate_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Mean |gate| of the product cross-attention and of gated reference attention, where the
    model has them: how far training has opened each path from the photos."""
    transformer = model.transformer
    metrics = {}
    if getattr(transformer, "uses_product_tokens", False):
        metrics["product_gate_abs_mean"] = transformer.product_gate_magnitude()
    reference = transformer.reference_gate_magnitude() if hasattr(transformer, "reference_gate_magnitude") else None
    if reference is not None:
        metrics["reference_gate_abs_mean"] = reference
    return metrics


def run_identity(cfg: RunConfig, data: TrainData, init_card: dict | None) -> str:
    """`<config name>-<hash>`: the same config on the same latents from the same start is the
    same run (started again, it resumes); anything else is a new run."""
    if cfg.train.run_name:
        return cfg.train.run_name
    digest = sha256_json(
        {"config": cfg.fingerprint(), "latents": [r["sha256"] for r in data.rows], "init_from": init_card}
    )
    return f"{cfg.name}-{digest[:10]}"


def _fresh_run_name(base: str) -> str:
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(cfg: RunConfig, resume: bool = True, init_from: str | None = None) -> dict:
    """Train stage 1 then stage 2 on the precomputed latents, tracked in MLflow.

    resume: continue the run's last checkpoint (same MLflow run, same loss curve); a finished run
    is returned as it is. False starts a new run folder and MLflow run. init_from: a model folder
    or URI (runs:/, models:/) whose generator is the starting point (fine-tuning, e.g. retrain).
    Returns {run_id, model_uri, run_dir, model_dir, global_step, final_loss, resumed_from_step}.

    Started by torchrun (tasks/training/torchrun.py), every rank runs this same function: it joins the
    process group, trains its share of each batch, and only rank 0 talks to MLflow and writes the
    run record and the model folder (tasks/training/distributed.py).
    """
    with joined_world(cfg.train) as world:
        if cfg.train.distributed.uses_torchrun and not world.launched:
            raise TrainingError(
                f"train.distributed asks for {cfg.train.distributed.nproc_per_node} process(es) with "
                f"{cfg.train.distributed.strategy}, but this process was not started by torchrun: train through "
                "the train flow (it starts torchrun), or set train.distributed.nproc_per_node=1 and strategy=ddp"
            )
        return _run_training(cfg, resume, init_from, world)


def _run_training(cfg: RunConfig, resume: bool, init_from: str | None, world: World) -> dict:
    data = TrainData.load(cfg)
    init_folder = resolve_model_uri(str(init_from)) if init_from is not None else None
    init_card = read_model_card(init_folder) if init_folder is not None else None
    name = run_identity(cfg, data, init_card)
    runs_dir = Path(cfg.train.runs_dir).expanduser().resolve()
    if not resume and (runs_dir / name).exists():
        name = _fresh_run_name(name)
    name = world.broadcast(name)  # a fresh name holds rank 0's clock
    run_root = DatasetRoot.create(runs_dir / name)
    run_file = run_root.path(RUN_FILE)
    record = world.broadcast(json.loads(run_file.read_text()) if run_file.is_file() else {})
    if record and record["config_fingerprint"] != cfg.fingerprint():
        raise IncompatibleCheckpointError(
            f"run folder {run_root.root} belongs to another run config; choose another train.run_name "
            "or pass resume=False"
        )
    if record.get("status") == "finished":
        return record["result"]

    device = world.device
    if init_folder is not None:
        model, _ = load_model_folder(init_folder, expect=cfg.model, data_dir=cfg.mlflow.data_dir)
    else:
        torch.manual_seed(cfg.train.seed)  # the fresh product layers' initial weights (the same on every rank)
        model = data.spec.build_generator()
    model.to(device).train()
    data.spec.speed_up_training(model, cfg.train.gradient_checkpointing, cfg.train.compile, device)
    prepare_model(model, world, cfg.train.distributed.strategy)

    run_id = None
    if world.is_main:
        setup_mlflow(cfg.mlflow.experiment, cfg.mlflow.data_dir)
        # nested: a caller's own MLflow run (e.g. retrain's) stays open around this one
        active = mlflow.start_run(
            run_id=record.get("mlflow_run_id"),
            run_name=None if record else name,
            nested=mlflow.active_run() is not None,
            log_system_metrics=cfg.mlflow.log_system_metrics,
        )
        run_id = active.info.run_id
        if not record:
            mlflow.log_params(flatten(cfg.model_dump(mode="json")))
            mlflow.log_params(
                {
                    "run.init_from": str(init_from),
                    "run.name": name,
                    "run.train_clips": len(data.rows),
                    "run.latents_signature": data.rows[0]["signature"],
                    "run.device": str(device),
                }
            )
            mlflow.log_text(cfg.to_yaml(), "run_config.yaml")
            record = {
                "mlflow_run_id": run_id,
                "config_fingerprint": cfg.fingerprint(),
                "run_name": name,
                "init_from": init_from,
                "status": "running",
            }
            run_root.write_json(RUN_FILE, record)
    run_id = world.broadcast(run_id)
    try:
        result = _train_stages(cfg, data, model, run_root, run_id, init_from, world)
    except BaseException:
        if world.is_main:
            mlflow.end_run(status="FAILED")
        raise
    if world.is_main:
        run_root.write_json(RUN_FILE, record | {"status": "finished", "result": result})
        mlflow.end_run()
    return result


def _train_stages(
    cfg: RunConfig,
    data: TrainData,
    model: torch.nn.Module,
    run_root: DatasetRoot,
    run_id: str,
    init_from: str | None,
    world: World,
) -> dict:
    device, strategy = world.device, cfg.train.distributed.strategy
    plans = plan_stages(cfg, len(data.rows))
    checkpoint = latest_checkpoint(run_root.root)
    resumed = read_checkpoint_meta(checkpoint, cfg) if checkpoint else None
    if resumed and world.is_main:
        mlflow.set_tag("resumed_from_step", resumed["global_step"])
    validation = ValidationBatch.load(cfg, data) if cfg.train.sample_every_epoch else None
    pipeline = None
    loss = resumed["loss"] if resumed else float("nan")
    for plan in plans:
        if resumed and plan.stage < resumed["stage"]:
            continue
        trainable = set_trainable(model, data.spec.trainable_names(model, plan.trains))
        trained = stage_module(model, world, strategy)
        optimizer = build_optimizer(model, trainable, cfg, plan.config, device)
        scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, plan.total_steps)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ema = EMAModel(params, decay=cfg.train.ema_decay) if cfg.train.ema_decay else None
        step = 0
        if resumed and plan.stage == resumed["stage"]:
            resume_checkpoint(checkpoint, model, optimizer, scheduler, ema)
            step = resumed["stage_step"]
        while step < plan.total_steps:
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            batches = data.micro_batches(cfg.train.seed, plan.stage, epoch, plan.config.batch_size)
            accum = plan.config.grad_accum
            chunk = batches[in_epoch * accum : (in_epoch + 1) * accum]
            global_step = plan.first_global_step + step + 1
            lr = scheduler.get_last_lr()[0]  # what this step uses (the scheduler then moves on)
            started = time.perf_counter()
            loss, diagnostics = train_step(
                data.spec,
                trained,
                [data.share(b, world, device) for b in chunk],
                cfg,
                optimizer,
                scheduler,
                ema,
                [_derive_seed(cfg.train.seed, "noise", plan.stage, step, i) for i in range(len(chunk))],
                world,
                device,
            )
            elapsed = time.perf_counter() - started
            step += 1
            gates = gate_metrics(model)  # on every rank: FSDP gathers the gates
            if world.is_main:
                mlflow.log_metrics(
                    {
                        "loss": loss,
                        "lr": lr,
                        "stage": plan.stage,
                        "epoch": epoch,
                        "throughput_samples_per_s": sum(map(len, chunk)) / elapsed,
                        **gates,
                        **diagnostics,
                    },
                    step=global_step,
                )
            epoch_done = step % plan.steps_per_epoch == 0 or step == plan.total_steps
            if step % cfg.train.checkpoint_every == 0 or step == plan.total_steps:
                meta = {
                    "stage": plan.stage,
                    "stage_step": step,
                    "global_step": global_step,
                    "mlflow_run_id": run_id,
                    "config_fingerprint": cfg.fingerprint(),
                    "loss": loss,
                }
                folder = save_training_checkpoint(run_root, world, model, trainable, optimizer, scheduler, ema, meta)
                if world.is_main:
                    mlflow.log_artifacts(str(folder), f"{CHECKPOINTS}/{folder.name}")
            if (
                validation is not None
                and epoch_done
                and ((epoch + 1) % cfg.train.sample_every_epoch == 0 or step == plan.total_steps)
            ):
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                pipeline = pipeline or data.spec.pipeline(model).to(device)
                model.eval()
                panels = generate_samples(pipeline, validation, cfg, device)
                if world.is_main:
                    log_samples(
                        panels, validation.fps, f"stage{plan.stage}-epoch{epoch + 1:03d}", run_root.path("samples")
                    )
                model.train()
                if ema is not None:
                    ema.restore(params)
        if ema is not None:  # the stage's result is its EMA
            ema.copy_to(params)
    final = plans[-1]
    global_step = final.first_global_step + final.total_steps
    model_dir = run_root.path(MODEL_DIR)
    whole = gather_model(model, world)
    if world.is_main:
        save_model_folder(
            model_dir,
            whole,
            cfg,
            adapter_only=final.trains == "adapter",
            info={
                "stage": final.stage,
                "step": global_step,
                "dataset_root": str(data.root.root),
                "run_id": run_id,
                "init_from": init_from,
                "ema": cfg.train.ema_decay is not None,
            },
        )
        mlflow.log_artifacts(str(model_dir), MODEL_DIR)
    world.barrier()  # the other ranks return once the model folder exists
    return {
        "run_id": run_id,
        "model_uri": f"runs:/{run_id}/{MODEL_DIR}",
        "run_dir": str(run_root.root),
        "model_dir": str(model_dir),
        "stage": final.stage,
        "global_step": global_step,
        "final_loss": loss,
        "resumed_from_step": resumed["global_step"] if resumed else None,
    }
