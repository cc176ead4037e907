"""The fast paths of training and generation, each one setting away from diffusers' plain path.

Measured against plain diffusers by benchmarks/bench_gpu.py (docs/performance.md, H200):

- compile: torch.compile of the repeated Wan block (regional compilation: compiled once, reused
  by every block). In training the checkpointed call itself is compiled, so the selective policy
  applies inside the compiled graph, at every micro-batch size, with Inductor's mix-order
  reduction off where torch needs it (pytorch/pytorch#193061: wrong gradients of Wan's
  scale_shift_table; `needs_mix_order_reduction_workaround`); in generation diffusers'
  `compile_repeated_blocks`. The lever that pays: a stage-2 step at batch 2 took 1.56 s instead
  of 2.50 s. CUDA only (on CPU compiling costs more than it saves on the small models run there).
- activation checkpointing "selective": per Wan block the attention outputs are kept and the rest
  (projections, norms, FFN) is recomputed in the backward pass; "full" (diffusers'
  `enable_gradient_checkpointing`) recomputes whole blocks, attention included. Selective pays
  only compiled: eager its per-op policy eats what the recompute saves (+62 ms and -29 ms a step
  in two runs).
- attention "cudnn": scaled_dot_product_attention tries cuDNN's fused attention first, then
  flash, mem-efficient and math (`torch.nn.attention.sdpa_kernel` priority). torch 2.11 already
  picks cuDNN for Wan's shapes on Hopper (so it measured no change there); the setting keeps the
  choice when another version or shape would fall back to flash. CPUs have no cuDNN attention.
- step cache (generation, never by default): diffusers' First Block Cache or MagCache skip the
  blocks of a step whose output they predict from earlier steps. It changes the output, by an
  amount that depends on the model: generation computes every step unless a model carries a
  calibrated `StepCache` (the evaluate flow's `--calibrate` measures it on that model and records
  it on its registry version; `python -m flows.generate --fast` uses it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, MagCacheConfig
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext
from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK
from packaging.version import Version
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models.transformer import ProductWanTransformer

ATTENTION_BACKENDS = ("cudnn", "default")

_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
)


def attention(backend: str, device: torch.device | str):
    """Context under which the model's forward (and backward) runs with `backend`."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {ATTENTION_BACKENDS}")
    if backend == "default" or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(_CUDNN_FIRST, set_priority=True)


def _keep_attention_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(function, *args):
    """torch.utils.checkpoint that keeps the attention outputs and recomputes the rest."""
    return checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_attention_outputs),
    )


def full_checkpoint(function, *args):
    """diffusers' default: recompute the whole block."""
    return checkpoint(function, *args, use_reentrant=False)


def no_checkpoint(function, *args):
    return function(*args)


CHECKPOINTING = {"selective": selective_checkpoint, "full": full_checkpoint, "none": no_checkpoint}


# -- compiling what is trained: pytorch/pytorch#193061 --------------------------------------------
#
# Inductor's mix-order reduction (`triton.mix_order_reduction`, on by default since torch 2.10)
# fuses a row reduction and a column reduction of one input into one kernel and finishes the
# column reduction with `buf = workspace[...].view(nsplit, rnumel).sum(dim=0)`. When `buf` is a
# view into a larger buffer, as the gradients of chunk()-ed slices of one shared parameter are
# (Wan's per-block `scale_shift_table`: its six slices' gradients are assembled by a cat), that
# line rebinds the name to a new tensor instead of writing into the view: that part of the
# gradient is never written and holds uninitialised or stale memory (pytorch/pytorch#193061, a
# 2.9.1 -> 2.10.0 regression, found on diffusers' Wan 2.1). Seen here on the H200 with torch
# 2.11 as wrong scale_shift_table gradients of compiled Wan blocks (docs/performance.md, "The
# compiled batch-1 gradient bug"). The fix, pytorch/pytorch#193103, copy_()s into the view; the
# torch 2.13.0 wheel still rebinds (torch/_inductor/codegen/simd.py,
# `_codegen_mix_order_reduction`, read on 2026-12), so no release is known to carry it and every
# torch from 2.10 on compiles training with mix-order reduction off. Per compile call (the
# `options` of torch.compile), never as a global setting. When a release carries #193103, set
# MIX_ORDER_REDUCTION_FIXED_IN to it, after benchmarks/probe_compiled_gradients.py agrees there.
MIX_ORDER_REDUCTION_BUG_SINCE = (2, 10)
MIX_ORDER_REDUCTION_FIXED_IN: tuple[int, int] | None = None
MIX_ORDER_REDUCTION_OFF = {"triton.mix_order_reduction": False}


def needs_mix_order_reduction_workaround(version: str | None = None) -> bool:
    """Whether torch `version` (default: the running one) has pytorch#193061: from 2.10 until a
    release known to carry its fix (MIX_ORDER_REDUCTION_FIXED_IN; none yet)."""
    release = Version(str(version or torch.__version__)).release[:2]
    if release < MIX_ORDER_REDUCTION_BUG_SINCE:
        return False
    return MIX_ORDER_REDUCTION_FIXED_IN is None or release < MIX_ORDER_REDUCTION_FIXED_IN


def training_compile_kwargs(workaround: bool | None = None) -> dict:
    """Keyword arguments of torch.compile (or diffusers' `compile_repeated_blocks`) for code whose
    backward is trained through: Inductor's mix-order reduction off where torch has #193061.
    workaround: force it on (True) or off (False, the probe's comparison); None decides by version."""
    if workaround is None:
        workaround = needs_mix_order_reduction_workaround()
    return {"options": dict(MIX_ORDER_REDUCTION_OFF)} if workaround else {}


def compiled_block_call(function, workaround: bool | None = None):
    """function(block, hidden_states, ...) compiled for training, at every micro-batch size.

    Until the #193061 workaround (training_compile_kwargs) one-clip micro-batches ran eagerly: on
    the H200 (torch 2.11) their compiled backward gave wrong scale_shift_table gradients.
    """
    return torch.compile(function, **training_compile_kwargs(workaround))


def apply_training_speed(
    transformer: ProductWanTransformer, checkpointing: str, compile_blocks: bool, device: torch.device | str
) -> None:
    """Route the training forward of every Wan block through `checkpointing`, compiled on CUDA
    when `compile_blocks` (through diffusers' gradient-checkpointing hook, which the block loop
    calls only while gradients are on: evaluation and sampling stay eager)."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing {checkpointing!r}: expected one of {tuple(CHECKPOINTING)}")
    function = CHECKPOINTING[checkpointing]
    if compile_blocks and torch.device(device).type == "cuda":
        function = compiled_block_call(function)
    elif checkpointing == "none":
        return
    transformer.wan.enable_gradient_checkpointing(function)


def apply_generation_speed(
    transformer: ProductWanTransformer,
    compile_blocks: bool,
    step_cache_threshold: float | None,
    device: torch.device | str,
) -> None:
    """Compile the Wan blocks (CUDA) and/or enable diffusers' First Block Cache on them at
    `step_cache_threshold` (None: every step exact; a calibrated cache: enable_step_cache)."""
    if step_cache_threshold is not None:
        transformer.wan.enable_cache(FirstBlockCacheConfig(threshold=step_cache_threshold))
    if compile_blocks and torch.device(device).type == "cuda":
        transformer.wan.compile_repeated_blocks()


# -- step caches: diffusers' First Block Cache and MagCache, calibrated per model ----------------

FIRST_BLOCK_CACHE, MAG_CACHE = "first_block_cache", "mag_cache"
STEP_CACHE_METHODS = (FIRST_BLOCK_CACHE, MAG_CACHE)
# The cache context the pipeline runs its (batched) guidance branches in (models/pipeline.py).
CACHE_CONTEXT = "guided"


@dataclass(frozen=True)
class StepCache:
    """A step cache for one model, as its calibration chose it (tasks/training/calibration.py).

    method: first_block_cache (skip the other blocks while the first block's output changed by
    less than `threshold`, relative, since the last full step) or mag_cache (skip while the
    accumulated error predicted from the model's magnitude ratios stays under `threshold`, at most
    3 steps in a row, never in the first 20% of steps: diffusers' MagCacheConfig defaults).
    steps: the sampler steps it was calibrated at. mag_ratios: MagCache's per-step magnitude
    ratios of this model (measured at `steps` steps; diffusers interpolates them to other counts).
    """

    method: str
    threshold: float
    steps: int
    mag_ratios: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.method not in STEP_CACHE_METHODS:
            raise ValueError(f"step cache {self.method!r}: expected one of {STEP_CACHE_METHODS}")
        if self.method == MAG_CACHE and not self.mag_ratios:
            raise ValueError("a MagCache step cache needs the model's magnitude ratios (mag_ratios)")

    def diffusers_config(self, steps: int | None = None):
        """diffusers' config of this cache for a call of `steps` sampler steps (default: calibrated)."""
        if self.method == FIRST_BLOCK_CACHE:
            return FirstBlockCacheConfig(threshold=self.threshold)
        return MagCacheConfig(
            threshold=self.threshold, num_inference_steps=steps or self.steps, mag_ratios=list(self.mag_ratios)
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mag_ratios"] = None if self.mag_ratios is None else [round(r, 6) for r in self.mag_ratios]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> StepCache:
        ratios = data.get("mag_ratios")
        return cls(
            data["method"], float(data["threshold"]), int(data["steps"]), None if ratios is None else tuple(ratios)
        )

    def describe(self) -> str:
        return f"{self.method} at threshold {self.threshold:g} (calibrated at {self.steps} steps)"


def disable_step_cache(transformer: ProductWanTransformer) -> None:
    """Every step exact again (nothing to do without a cache)."""
    if transformer.wan.is_cache_enabled:
        transformer.wan.disable_cache()


def enable_step_cache(transformer: ProductWanTransformer, cache: StepCache | None, steps: int | None = None) -> None:
    """Put `cache` on the Wan blocks for calls of `steps` steps, replacing any other; None: exact."""
    disable_step_cache(transformer)
    if cache is not None:
        transformer.wan.enable_cache(cache.diffusers_config(steps))


def _cache_state_manager(transformer: ProductWanTransformer):
    registry = HookRegistry.check_if_exists_or_initialize(transformer.wan.blocks[0])
    hook = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) or registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
    if hook is None:
        raise ValueError("no step cache on this transformer: every call runs every block")
    return hook.state_manager


class StepCacheProbe:
    """A pipeline callback(step, total) that reads the step cache's own state after each step:
    how many steps ran every block (`full_steps` of `steps`), and in MagCache's calibration mode
    the magnitude ratios measured so far (`mag_ratios`). Create it after enabling the cache; it
    counts inside compiled blocks too (the cache decides outside the compiled region)."""

    def __init__(self, transformer: ProductWanTransformer):
        self.manager = _cache_state_manager(transformer)
        self.full_steps = self.steps = 0
        self.mag_ratios: list[float] = []

    def _state(self):
        previous = self.manager._context
        self.manager.set_context(CacheContext(CACHE_CONTEXT))
        try:
            return self.manager.get_state()
        finally:
            self.manager.set_context(previous)

    def __call__(self, step: int, total: int) -> None:
        state = self._state()
        self.steps += 1
        self.full_steps += bool(state.should_compute)
        ratios = getattr(state, "calibration_ratios", None)
        if ratios:
            self.mag_ratios = [float(r) for r in ratios]

    @property
    def full_step_fraction(self) -> float:
        return self.full_steps / self.steps if self.steps else 1.0


def measure_mag_ratios(
    transformer: ProductWanTransformer, generate: Callable[[StepCacheProbe], object], steps: int
) -> list[float]:
    """MagCache's magnitude ratios of this model: `generate(callback)` runs one generation of
    `steps` steps (every step exact) under diffusers' MagCache in calibration mode, and the ratio
    of each step's residual norm to the previous one's is read after each step."""
    # num_inference_steps one past the call: diffusers would otherwise reset (and print) the
    # ratios inside the last step, before the callback reads them.
    enable_step_cache(transformer, None)
    transformer.wan.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    try:
        probe = StepCacheProbe(transformer)
        generate(probe)
    finally:
        disable_step_cache(transformer)
    if len(probe.mag_ratios) != steps:
        raise RuntimeError(f"MagCache calibration measured {len(probe.mag_ratios)} ratios for {steps} steps")
    return probe.mag_ratios


class FullStepCounter:
    """Counts the denoiser calls that ran every block, from the First Block Cache's own decisions
    (a hook on a block would not count inside compiled blocks). Create it after enabling the
    cache, before the first call."""

    def __init__(self, transformer: ProductWanTransformer):
        self.count = 0
        hook = HookRegistry.check_if_exists_or_initialize(transformer.wan.blocks[0]).get_hook(_FBC_LEADER_BLOCK_HOOK)
        if hook is None:
            raise ValueError("no step cache on this transformer: every call runs every block")
        decide = hook._should_compute_remaining_blocks
        hook._should_compute_remaining_blocks = torch.compiler.disable(lambda residual: self._counted(decide(residual)))

    def _counted(self, full: bool) -> bool:
        self.count += full
        return full
