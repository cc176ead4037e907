"""What changes when several processes run tasks/training/train.py's one training loop (docs/distributed.md).

tasks/training/torchrun.py starts the processes; here is what each of them does differently:

- `World`: this process's rank in torchrun's process group, joined from torchrun's environment
  (`joined_world`), or a plain single process; with the few collectives the loop needs (sum,
  broadcast, barrier), which do nothing in a single process.
- The batch is global: each micro-batch of `batch_size` clips is cut into contiguous row ranges,
  one per rank (`rank_rows`). The loop draws the noise of the whole micro-batch and keeps its rows,
  and divides its error by the weight sum of the whole micro-batch, so N ranks compute what one
  process computes on the same micro-batch, up to float rounding.
- ddp: DistributedDataParallel, built again for each stage, because DDP registers its gradient
  hooks on the parameters that require gradients when it is built and stage 2 trains more of them.
- fsdp: FSDP2 `fully_shard` of every Wan block, the transformer, the product encoder, then the
  whole generator, once; FSDP2 reads requires_grad at every all-gather, so stages still switch.
- Checkpoints of a torchrun launch are DCP folders (torch.distributed.checkpoint), keyed by
  parameter name, so they load on any number of ranks, a single process included.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from diffusers.training_utils import EMAModel
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from models.device import resolve_device
from models.product_encoder import ProductEncoder
from models.transformer import ProductVideoGenerator, ProductWanTransformer
from storage.layout import DatasetRoot
from tasks.training.run_config import TrainConfig

DCP_METADATA = ".metadata"  # the file DCP's FileSystemWriter writes last, naming every shard
# A checkpoint holds the stage's trainable weights only (the frozen ones come from the base model).
CHECKPOINT_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a torchrun launch; `World()` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # a torchrun rank with a process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, count: int) -> slice:
        return rank_rows(count, self.rank, self.size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks, detached."""
        total = tensor.detach().clone()
        if self.launched:
            dist.all_reduce(total)
        return total

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (for decisions that must agree, e.g. a timestamped run name)."""
        if not self.launched:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()


def rank_rows(count: int, rank: int, size: int) -> slice:
    """The rows of a batch of `count` that `rank` of `size` trains on: contiguous, sizes differ by
    at most one, the first ranks take the extra rows; empty when count < size."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _backend(configured: str, device: torch.device) -> str:
    if configured != "auto":
        return configured
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def joined_world(train: TrainConfig) -> Iterator[World]:
    """The process group of the torchrun launch this process is a rank of (joined from torchrun's
    environment variables, left at the end); a single process when torchrun did not start it."""
    device = resolve_device(train.device)
    if not dist.is_torchelastic_launched():
        yield World(device=device)
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        _backend(train.distributed.backend, device), device_id=device if device.type == "cuda" else None
    )
    try:
        yield World(
            rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, launched=True, device=device
        )
    finally:
        dist.destroy_process_group()


# -- the model ---------------------------------------------------------------------------------


def shard(model: ProductVideoGenerator) -> None:
    """FSDP2 in place: every Wan block, then the transformer and the product encoder (the sampling
    pipeline calls those two directly), then the generator (the training forward)."""
    for block in model.transformer.wan.blocks:
        fully_shard(block)
    fully_shard(model.transformer)
    if model.product_encoder is not None:
        fully_shard(model.product_encoder)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def prepare_model(model: ProductVideoGenerator, world: World, strategy: str) -> None:
    """Once, before training: shard the model when the launch uses fsdp."""
    if world.launched and strategy == "fsdp":
        shard(model)


def stage_module(model: ProductVideoGenerator, world: World, strategy: str) -> nn.Module:
    """What the training forward of a stage calls, built after the stage set requires_grad: a DDP
    wrapper under ddp, else the model itself (FSDP's hooks live in the sharded model)."""
    if world.launched and strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    return model


def gather_model(model: ProductVideoGenerator, world: World) -> ProductVideoGenerator | None:
    """The whole generator on rank 0 (None on the other ranks), for the model folder.

    An unsharded model is returned as it is. FSDP shards are gathered to rank 0's CPU and loaded
    into a copy built on the meta device, so no rank materialises the weights twice.
    """
    if not is_sharded(model):
        return model if world.is_main else None
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    with torch.device("meta"):
        encoder = model.product_encoder
        copy = ProductVideoGenerator(
            ProductWanTransformer.from_config(model.transformer.config),
            None if encoder is None else ProductEncoder.from_config(encoder.config),
        )
    copy.load_state_dict(full, assign=True)
    return copy


# -- sharded checkpoints -----------------------------------------------------------------------


class TrainableState(Stateful):
    """The trainable weights and their optimizer state, keyed by parameter name (DCP reshards them
    onto any number of ranks; DDP's and FSDP's own prefixes are taken off)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        weights, optimizer = get_state_dict(self.model, self.optimizer, options=CHECKPOINT_OPTIONS)
        return {"model": weights, "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=CHECKPOINT_OPTIONS,
        )


def _checkpoint_state(model, optimizer, scheduler, ema: EMAModel | None) -> dict:
    """What a sharded checkpoint holds; DCP calls each entry's state_dict() on save and
    load_state_dict() on load. The EMA's shadow weights are shards like the weights they follow.
    No RNG state: every random draw of training comes from seeds derived from (seed, stage, step)."""
    return {"trainable": TrainableState(model, optimizer), "scheduler": scheduler} | (
        {"ema": ema} if ema is not None else {}
    )


def save_sharded(folder: Path, model, optimizer, scheduler, ema: EMAModel | None) -> None:
    """Every rank writes its shards into `folder` (collective)."""
    dcp.save(_checkpoint_state(model, optimizer, scheduler, ema), checkpoint_id=folder)


def load_sharded(folder: Path, model, optimizer, scheduler, ema: EMAModel | None) -> None:
    """Load a DCP checkpoint written by any number of ranks into this world's model and state."""
    dcp.load(_checkpoint_state(model, optimizer, scheduler, ema), checkpoint_id=folder)


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / DCP_METADATA).is_file()


@contextmanager
def shared_atomic_dir(root: DatasetRoot, rel: str, world: World) -> Iterator[Path]:
    """DatasetRoot.atomic_dir for all ranks at once: rank 0 makes the temporary folder, every rank
    writes into it, and rank 0 moves it into place once all of them are done."""
    with root.atomic_dir(rel) if world.is_main else nullcontext() as tmp:
        shared = Path(world.broadcast(str(tmp) if world.is_main else None))
        yield shared
        world.barrier()
