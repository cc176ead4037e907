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


def sample_sigmas(
    batch_size: int, cfg: ObjectiveConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Noise levels s in (0, 1), one per sample, from the configured distribution, then shifted."""
    if cfg.timestep_sampling == "uniform":
        sigmas = torch.rand(batch_size, generator=generator, device=device)
    else:
        normal = torch.randn(batch_size, generator=generator, device=device)
        sigmas = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    return shift_sigmas(sigmas, cfg.shift)


def sample_condition_keep(
    batch_size: int, cfg: ObjectiveConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
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

    def rows(self, part: slice) -> NoiseDraw:
        return NoiseDraw(*(getattr(self, field.name)[part] for field in fields(self)))


def draw_noise(
    shape: torch.Size | tuple[int, ...],
    cfg: ObjectiveConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> NoiseDraw:
    """Noise levels, noise and condition keep flags for a batch of latents of `shape`.

    A data-parallel rank draws them for the whole global batch and keeps its own rows
    (NoiseDraw.rows), so N ranks train on exactly the draws one process would make.
    """
    sigmas = sample_sigmas(shape[0], cfg, generator, device)
    noise = torch.randn(shape, generator=generator, device=device)
    keep_text, keep_product = sample_condition_keep(shape[0], cfg, generator, device)
    return NoiseDraw(sigmas, noise, keep_text, keep_product)


NOISE_BANDS = (0.0, 0.25, 0.5, 0.75, 1.0)  # noise levels s by which the loss inside / outside the mask is logged


@dataclass(frozen=True)
class LossParts:
    """Sums over a batch's rows, returned apart so that data-parallel ranks divide by the sums of
    the whole global batch (the loss is a ratio of sums, not a mean of per-rank means), plus
    per-sample diagnostics (detached)."""

    flow_error: torch.Tensor  # sum of weighted squared velocity errors
    flow_weight: torch.Tensor  # sum of their weights
    mask_error: torch.Tensor  # sum over latent cells of masked fraction x squared error (channel mean)
    mask_weight: torch.Tensor  # sum of the masked fractions
    inside: torch.Tensor  # (B,) mean squared error inside the mask (NaN without mask)
    outside: torch.Tensor  # (B,) mean squared error outside it

    def loss(
        self, cfg: ObjectiveConfig, flow_weight: torch.Tensor | None = None, mask_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L_flow + mask_loss_weight * L_mask; the weights default to this batch's own sums."""
        flow_weight = self.flow_weight if flow_weight is None else flow_weight
        mask_weight = self.mask_weight if mask_weight is None else mask_weight
        loss = self.flow_error / flow_weight
        if cfg.mask_loss_weight:
            loss = loss + cfg.mask_loss_weight * self.mask_error / mask_weight.clamp_min(1e-6)
        return loss


def loss_parts(spec, model, batch: dict, draw: NoiseDraw, cfg: ObjectiveConfig) -> LossParts:
    """The squared velocity errors of one batch, as the sums and diagnostics of LossParts.

    spec: the models.spec.ModelSpecification that runs `model` on the batch. L_flow weighs a cell
    1 + masked_region_weight x (its masked fraction); L_mask averages over the masked cells alone
    (OmniInsert's subject-mask term), so a small product weighs as much as a large one.
    """
    clean = batch["latents"].float()
    sigma = draw.sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * clean + sigma * draw.noise
    predicted = spec.predict(
        model, batch, noisy, draw.sigmas * NUM_TRAIN_TIMESTEPS, keep_text=draw.keep_text, keep_product=draw.keep_product
    )
    squared_error = (predicted.float() - (draw.noise - clean)) ** 2
    masked = batch["packed_mask"].float().mean(dim=1, keepdim=True)  # (B, 1, T', h, w) masked fraction per cell
    weight = 1 + cfg.masked_region_weight * masked
    per_cell = squared_error.mean(dim=1, keepdim=True)
    with torch.no_grad():
        cells = (1, 2, 3, 4)
        inside = (per_cell * masked).sum(cells) / masked.sum(cells)
        outside = (per_cell * (1 - masked)).sum(cells) / (1 - masked).sum(cells).clamp_min(1e-6)
    return LossParts(
        flow_error=(squared_error * weight).sum(),
        flow_weight=weight.sum() * squared_error.shape[1],
        mask_error=(per_cell * masked).sum(),
        mask_weight=masked.sum(),
        inside=inside,
        outside=outside,
    )


def flow_matching_loss(
    spec, model, batch: dict, cfg: ObjectiveConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """L_flow + mask_loss_weight * L_mask of one batch (models/spec.py's collated batch)."""
    clean = batch["latents"]
    return loss_parts(spec, model, batch, draw_noise(clean.shape, cfg, generator, clean.device), cfg).loss(cfg)


def banded_losses(parts: LossParts, sigmas: torch.Tensor) -> dict[str, float]:
    """MLflow metrics: the loss inside and outside the mask, overall and per noise band (where the
    band has samples): whether a run learns the product region or only copies the context."""
    metrics = {}
    for where, values in (("inside_mask", parts.inside), ("outside_mask", parts.outside)):
        finite = torch.isfinite(values)
        if finite.any():
            metrics[f"loss_{where}"] = float(values[finite].mean())
        for low, high in zip(NOISE_BANDS, NOISE_BANDS[1:]):
            band = finite & (sigmas >= low) & ((sigmas < high) | (high == NOISE_BANDS[-1]))
            if band.any():
                metrics[f"loss_{where}_s{low:.2f}-{high:.2f}"] = float(values[band].mean())
    return metrics
