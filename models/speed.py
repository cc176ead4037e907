"""The fast paths of training and generation, each one setting away from diffusers' plain path.

Measured against plain diffusers by benchmarks/bench_gpu.py (docs/performance.md, H200):

- compile: torch.compile of the repeated Wan block (regional compilation: compiled once, reused
  by every block). In training the checkpointed call itself is compiled, so the selective policy
  applies inside the compiled graph; in generation diffusers' `compile_repeated_blocks`. The lever
  that pays: a stage-2 step at batch 2 took 1.56 s instead of 2.50 s. CUDA only (on CPU compiling
  costs more than it saves on the small models run there); micro-batches of one clip stay eager
  (compiled_block_call says why).
- activation checkpointing "selective": per Wan block the attention outputs are kept and the rest
  (projections, norms, FFN) is recomputed in the backward pass; "full" (diffusers'
  `enable_gradient_checkpointing`) recomputes whole blocks, attention included. Selective pays
  only compiled: eager its per-op policy eats what the recompute saves (+62 ms and -29 ms a step
  in two runs).
- attention "cudnn": scaled_dot_product_attention tries cuDNN's fused attention first, then
  flash, mem-efficient and math (`torch.nn.attention.sdpa_kernel` priority). torch 2.11 already
  picks cuDNN for Wan's shapes on Hopper (so it measured no change there); the setting keeps the
  choice when another version or shape would fall back to flash. CPUs have no cuDNN attention.
- step cache (generation): diffusers' First Block Cache. Where the first block's output has
  changed by less than a threshold since the last full step, the other blocks are skipped and
  their last residual reused. It changes the output: at the default 0.2 the PoC model lost
  0.02 dB of mask PSNR (experiments/poc/step_cache.py measures it on any trained model).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
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


def compiled_block_call(function, one_clip_function):
    """function(block, hidden_states, ...) compiled; micro-batches of one clip run
    one_clip_function eagerly instead.

    Seen on the H200 (torch 2.11, docs/performance.md): at batch 1 the compiled backward of Wan
    blocks gave wrong gradients, worst for their scale_shift_tables (the loss agreed), under
    selective, full and no checkpointing alike; at batch 2 they agreed to bf16 rounding.
    """
    compiled = torch.compile(function)

    def call(block, hidden_states, *args):
        return (one_clip_function if hidden_states.shape[0] == 1 else compiled)(block, hidden_states, *args)

    return call


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
        # Eager, the selective policy (a dispatch mode seeing every op) gained nothing clear and
        # held 1.7 GiB more (measured): the eager fallback recomputes whole blocks instead.
        function = compiled_block_call(function, full_checkpoint if checkpointing == "selective" else function)
    elif checkpointing == "none":
        return
    transformer.wan.enable_gradient_checkpointing(function)


def apply_generation_speed(
    transformer: ProductWanTransformer,
    compile_blocks: bool,
    step_cache_threshold: float | None,
    device: torch.device | str,
) -> None:
    """Compile the Wan blocks (CUDA) and/or enable diffusers' First Block Cache on them."""
    if step_cache_threshold is not None:
        transformer.wan.enable_cache(FirstBlockCacheConfig(threshold=step_cache_threshold))
    if compile_blocks and torch.device(device).type == "cuda":
        transformer.wan.compile_repeated_blocks()


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
