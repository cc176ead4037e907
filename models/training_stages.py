"""The two training stages of the seed (section 4.1), with the patch embedding it forgot.

Stage 1 (adapter): the product encoder (input projection, queries, attention, norms, output
projection), every product cross-attention with its norms and gate, and the widened patch
embedding (the new z_masked/mask channels are slices of that one conv weight, so the whole conv
trains; it is 36 x dim x 4 weights). Stage 2: the same plus all DiT blocks. The VAE, text and
image encoders are never part of the generator, so they stay frozen by construction; Wan's
time/text embedders and output head stay frozen in both stages.
"""
from __future__ import annotations

from torch import nn

STAGES = (1, 2)


def _is_stage1(name: str) -> bool:
    return (name.startswith("product_encoder.")
            or name.startswith("transformer.wan.patch_embedding.")
            or ".attn2.processor." in name)


def trainable_parameter_names(model: nn.Module, stage: int) -> set[str]:
    """Names (as in model.named_parameters()) that train in `stage` for a ProductVideoGenerator."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage}")
    names = {name for name, _ in model.named_parameters()}
    stage1 = {name for name in names if _is_stage1(name)}
    if stage == 1:
        return stage1
    return stage1 | {name for name in names if name.startswith("transformer.wan.blocks.")}


def set_training_stage(model: nn.Module, stage: int) -> set[str]:
    """Set requires_grad for the stage; returns the trainable names (hand them to the optimizer)."""
    trainable = trainable_parameter_names(model, stage)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return trainable
