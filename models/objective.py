"""Rectified-flow objective as Wan2.1 was trained, with condition dropout for guidance.

x_s = (1 - s) x0 + s e with e ~ N(0, I); the model sees timestep 1000 s and predicts the
velocity v = e - x0 (MSE). s is drawn uniformly or logit-normally in (0, 1), then shifted with
s' = shift s / (1 + (shift - 1) s): shift > 1 spends more steps at high noise, the same map the
sampler's flow_shift applies to its sigma grid, so training sees timesteps where sampling spends
them. Latents are Wan-normalised: (z - latents_mean) / latents_std per channel.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from models.config import ObjectiveConfig

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-shift map of diffusers' FlowMatchEuler/UniPC schedulers."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch_size: int, cfg: ObjectiveConfig, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise levels s in (0, 1), one per sample, from the configured distribution, then shifted."""
    if cfg.timestep_sampling == "uniform":
        sigmas = torch.rand(batch_size, generator=generator, device=device)
    else:
        normal = torch.randn(batch_size, generator=generator, device=device)
        sigmas = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    return shift_sigmas(sigmas, cfg.shift)


def sample_condition_keep(batch_size: int, cfg: ObjectiveConfig, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample keep flags (keep_text, keep_product) in {0., 1.}: with drop_both_prob both
    conditions are dropped, with drop_product_prob only the product, with drop_text_prob only
    the text; so guidance has all three branches it uses (full, no product, neither)."""
    total = cfg.drop_both_prob + cfg.drop_product_prob + cfg.drop_text_prob
    if total > 1:
        raise ValueError(f"condition dropout probabilities sum to {total} > 1")
    draw = torch.rand(batch_size, generator=generator, device=device)
    drop_both = draw < cfg.drop_both_prob
    drop_product = (draw >= cfg.drop_both_prob) & (draw < cfg.drop_both_prob + cfg.drop_product_prob)
    drop_text = (draw >= cfg.drop_both_prob + cfg.drop_product_prob) & (draw < total)
    keep_text = (~(drop_both | drop_text)).float()
    keep_product = (~(drop_both | drop_product)).float()
    return keep_text, keep_product


@dataclass(frozen=True)
class NoiseDraw:
    """The random part of one loss evaluation, one row per sample."""

    sigmas: torch.Tensor  # (B,) noise levels, shifted
    noise: torch.Tensor  # like the latents
    keep_text: torch.Tensor  # (B,) in {0., 1.}
    keep_product: torch.Tensor

    def rows(self, part: slice) -> "NoiseDraw":
        return NoiseDraw(*(getattr(self, field.name)[part] for field in fields(self)))


def draw_noise(shape: torch.Size | tuple[int, ...], cfg: ObjectiveConfig, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> NoiseDraw:
    """Noise levels, noise and condition keep flags for a batch of latents of `shape`.

    A data-parallel rank draws them for the whole global batch and keeps its own rows
    (NoiseDraw.rows), so N ranks train on exactly the draws one process would make.
    """
    sigmas = sample_sigmas(shape[0], cfg, generator, device)
    noise = torch.randn(shape, generator=generator, device=device)
    keep_text, keep_product = sample_condition_keep(shape[0], cfg, generator, device)
    return NoiseDraw(sigmas, noise, keep_text, keep_product)


def weighted_error(model, batch: dict, draw: NoiseDraw, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted squared velocity errors, sum of their weights): the loss is their ratio.

    Returned apart so that data-parallel ranks can divide their errors by the weight sum of the
    whole global batch: the loss is a ratio of sums over the batch, not a mean of per-rank means.
    Cells under the mask weigh 1 + masked_region_weight x (masked fraction).
    """
    clean = batch["latents"].float()
    sigma = draw.sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * clean + sigma * draw.noise
    predicted = model(noisy, batch["masked_latents"], batch["packed_mask"], draw.sigmas * NUM_TRAIN_TIMESTEPS,
                      batch["text_embeds"], batch["image_tokens"], batch["image_mask"],
                      keep_text=draw.keep_text, keep_product=draw.keep_product)
    squared_error = (predicted.float() - (draw.noise - clean)) ** 2
    weight = 1 + cfg.masked_region_weight * batch["packed_mask"].float().mean(dim=1, keepdim=True)
    return (squared_error * weight).sum(), weight.sum() * squared_error.shape[1]


def flow_matching_loss(model, batch: dict, cfg: ObjectiveConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Weighted MSE between the predicted and the true velocity.

    model: a models.transformer.ProductVideoGenerator. batch (precomputed, on the model's device):
    latents (B, 16, T', h, w) and masked_latents (same) Wan-normalised, packed_mask (B, 4, T', h, w)
    from models.transformer.pack_mask, text_embeds (B, L, text_dim), image_tokens (B, N, L_img, D),
    image_mask (B, N) bool.
    """
    clean = batch["latents"]
    error, weight = weighted_error(model, batch, draw_noise(clean.shape, cfg, generator, clean.device), cfg)
    return error / weight
