"""Product encoder: 1-5 product photos -> K product tokens at the DiT width.

The frozen image encoder (Wan I2V's CLIP ViT-H/14, `hidden_states[-2]`, 257 x 1280 per image)
runs outside this module: training reads precomputed tokens, inference calls
`encode_product_images`. `ProductEncoder` is the trainable resampler (seed 3.2): K learnable
queries cross-attend over the tokens of all given images at once, then LayerNorm and a projection
to the DiT width. It has no view embedding, so it treats the photos as an unordered set.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class ProductEncoder(ModelMixin, ConfigMixin):
    """(B, N, L, image_dim) image tokens + (B, N) image mask -> (B, K, output_dim)."""

    @register_to_config
    def __init__(
        self,
        image_dim: int = 1280,
        hidden_dim: int = 1024,
        num_tokens: int = 64,
        num_heads: int = 16,
        output_dim: int = 1536,
    ):
        super().__init__()
        # The seed's MultiheadAttention(hidden_dim) cannot read 1280-wide CLIP tokens directly.
        self.input_proj = nn.Linear(image_dim, hidden_dim)
        self.input_norm = nn.LayerNorm(hidden_dim)
        self.query_tokens = nn.Parameter(torch.randn(num_tokens, hidden_dim) * hidden_dim**-0.5)
        self.cross_attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """image_mask[b, n] is True where image n of sample b is given (padding is False)."""
        batch, num_images, tokens_per_image, _ = image_tokens.shape
        if image_mask.shape != (batch, num_images):
            raise ValueError(f"image_mask shape {tuple(image_mask.shape)} != {(batch, num_images)}")
        if not bool(image_mask.any(dim=1).all()):
            raise ValueError(
                "every sample needs at least one product image (the null product is "
                "expressed by zero product tokens, not by zero images)"
            )
        keys = self.input_norm(self.input_proj(image_tokens.flatten(1, 2)))
        key_padding_mask = ~image_mask.bool().repeat_interleave(tokens_per_image, dim=1)
        queries = self.query_tokens.unsqueeze(0).expand(batch, -1, -1).to(keys.dtype)
        attended, _ = self.cross_attn(queries, keys, keys, key_padding_mask=key_padding_mask, need_weights=False)
        return self.proj_out(self.norm(attended + queries))


@torch.no_grad()
def encode_product_images(image_encoder, image_processor, images_per_sample, max_images: int = 5):
    """Run the frozen CLIP vision tower over each sample's photos, padding to the largest N.

    images_per_sample: a list (one entry per sample) of 1..max_images PIL images or HxWx3 uint8
    arrays. Returns (tokens (B, N, L, D) as `hidden_states[-2]`, as diffusers' Wan I2V pipeline
    uses them, and mask (B, N) bool).
    """
    counts = [len(images) for images in images_per_sample]
    if not counts or min(counts) < 1 or max(counts) > max_images:
        raise ValueError(f"each sample needs 1..{max_images} product images, got counts {counts}")
    flat = [
        np.asarray(image) if not hasattr(image, "convert") else image.convert("RGB")
        for images in images_per_sample
        for image in images
    ]
    device = next(image_encoder.parameters()).device
    dtype = next(image_encoder.parameters()).dtype
    pixels = image_processor(images=flat, return_tensors="pt")["pixel_values"].to(device, dtype)
    hidden = image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    tokens = hidden.new_zeros(len(counts), max(counts), *hidden.shape[1:])
    mask = torch.zeros(len(counts), max(counts), dtype=torch.bool, device=device)
    start = 0
    for sample, count in enumerate(counts):
        tokens[sample, :count] = hidden[start : start + count]
        mask[sample, :count] = True
        start += count
    return tokens, mask
