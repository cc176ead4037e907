"""Wan2.1 DiT with masked-video input channels and two ways for product photos to reach it.

`ProductWanTransformer` holds an unchanged diffusers `WanTransformer3DModel` (loaded with
`from_pretrained`) and adds, without copying diffusers' block code:

- input channels: the patch embedding is widened from 16 to 16 + 16 + 4 = 36 input channels
  (z_t, z_masked, packed mask); the new weights start at zero.
- reference latents (`reference: latents | both`, docs/model.md "Reference conditioning"): each
  photo's VAE latent is one extra latent frame after the video (RoPE time T', T'+1, ...), in the
  z_t slot, with timestep 0 for its tokens (Wan's blocks take per-token timesteps); the blocks'
  self-attention `attn1` gets a `ReferenceAttnProcessor` (joint: one softmax over video and
  reference tokens; gated: video attention + per-head gate x attention over the reference, with a
  LoRA on the reference tokens' q/k/v). Reference tokens are dropped before the output head.
- product tokens (`reference: clip | both`): in each injected block, the text cross-attention `attn2` gets a
  `ProductAttnProcessor` (diffusers' attention-processor mechanism, as its IP-Adapters use). The
  block passes `concat([text, product])` as its context; the processor splits off the last K
  tokens, runs Wan's own processor on the text and adds `gate * RMSNorm(product_attn(x, product))`
  with the gate at zero. diffusers' own image path assumes 512 text tokens, so it is not reused.

Wan's weights keep their names (`wan.blocks.3.attn2.to_q...`), so base checkpoints load
unchanged; new weights live under `wan.patch_embedding` and `wan.blocks.*.attn{1,2}.processor`.
With gates and new channels at zero (and `gated` reference attention) the model computes exactly
the base T2V function (tests/test_model_transformer.py checks it against diffusers' own forward).

The null product condition is K zero tokens: product key/value/output projections have no bias
and the q/k/output norms are RMSNorms, so zero tokens contribute exactly zero, and the
"no product" branch of guidance is the base model with the masked-video channels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.hooks import HookRegistry
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import load_file, save_file
from torch import nn

from models.product_encoder import ProductEncoder

LATENT_CHANNELS = 16
TEMPORAL_FACTOR = 4  # Wan VAE: 4 frames per latent frame (the first frame alone)
SPATIAL_FACTOR = 8
MASK_CHANNELS = TEMPORAL_FACTOR
CONDITION_CHANNELS = LATENT_CHANNELS + MASK_CHANNELS  # z_masked + packed mask

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def pack_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (B, 1, T, H, W) or (B, T, H, W), T = 4k+1, 1 = region to generate
    -> (B, 4, k+1, h, w), Wan I2V's temporal fold.

    Each 8x8 cell becomes the fraction of its pixels under the mask (area pooling keeps thin
    objects that nearest sampling would drop). The first frame is repeated to 4, so latent frame
    i carries the masks of exactly the 4 pixel frames the VAE folded into it.
    """
    if mask.ndim == 4:
        mask = mask.unsqueeze(1)
    batch, _, frames, height, width = mask.shape
    latent_h, latent_w = latent_hw
    if (frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"mask has {frames} frames; Wan needs 4k+1")
    if height % latent_h or width % latent_w:
        raise ValueError(f"mask {height}x{width} is not a multiple of latent {latent_h}x{latent_w}")
    per_frame = mask.float().transpose(1, 2).reshape(batch * frames, 1, height, width)
    pooled = F.avg_pool2d(per_frame, (height // latent_h, width // latent_w))
    pooled = pooled.reshape(batch, frames, latent_h, latent_w)
    padded = torch.cat([pooled[:, :1].expand(-1, TEMPORAL_FACTOR - 1, -1, -1), pooled], dim=1)
    return padded.reshape(batch, -1, TEMPORAL_FACTOR, latent_h, latent_w).transpose(1, 2)


def build_dit_input(noisy_latents, masked_latents, packed_mask) -> torch.Tensor:
    """concat([z_t, z_masked, packed mask]) on channels: (B, 36, T', h, w)."""
    return torch.cat(
        [noisy_latents, masked_latents.to(noisy_latents.dtype), packed_mask.to(noisy_latents.dtype)], dim=1
    )


class ProductAttnProcessor(nn.Module):
    """Wan's text cross-attention plus a gated cross-attention over the last K context tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, num_product_tokens: int, eps: float = 1e-6):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.num_product_tokens = num_product_tokens
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.norm_q = nn.RMSNorm(inner, eps=eps)  # across heads, as Wan's qk_norm
        self.norm_k = nn.RMSNorm(inner, eps=eps)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.norm_out = nn.RMSNorm(dim, eps=eps)
        self.gate = nn.Parameter(torch.zeros(dim))
        self.text_processor = WanAttnProcessor()

    def product_attention(self, hidden_states, product_tokens):
        query = self.norm_q(self.to_q(hidden_states)).unflatten(2, (self.heads, -1)).transpose(1, 2)
        key = self.norm_k(self.to_k(product_tokens)).unflatten(2, (self.heads, -1)).transpose(1, 2)
        value = self.to_v(product_tokens).unflatten(2, (self.heads, -1)).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2)
        return self.norm_out(self.to_out(attended.type_as(hidden_states)))

    def forward(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, rotary_emb=None):
        text = encoder_hidden_states[:, : -self.num_product_tokens]
        product = encoder_hidden_states[:, -self.num_product_tokens :]
        text_out = self.text_processor(attn, hidden_states, text, attention_mask, rotary_emb)
        return text_out + self.gate * self.product_attention(hidden_states, product)


def apply_rotary_emb(states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, L, heads, head_dim), as diffusers' WanAttnProcessor applies it
    (there it is a closure inside __call__, so it cannot be imported)."""
    x1, x2 = states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(states)


def _attend(query, key, value, key_mask=None) -> torch.Tensor:
    """SDPA on (B, L, heads, d) tensors; key_mask (B, L_k) bool, True = attend."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class LowRank(nn.Module):
    """x -> up(down(x)), `up` at zero: a LoRA delta that starts as exactly nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class ReferenceAttnProcessor(nn.Module):
    """Self-attention over [video tokens | reference tokens] for Wan's `attn1`.

    The block passes `rotary_emb` straight to this processor, so the forward sends
    (freqs_cos, freqs_sin, reference_keys) through it: reference_keys (B, L_ref) bool marks the
    reference tokens that exist (a padded photo slot or a dropped product is False), and its
    length says where the video tokens end. No state lives outside the call (compile-friendly).

    joint: one softmax over all valid tokens (Phantom-Wan, Concat-ID): no new weights.
    gated: video out = A(q_v, K_v, V_v) + gate_h * A(q_v, K_ref, V_ref), reference out =
    A(q_ref, K_ref, V_ref) with a LoRA on the reference tokens' q/k/v (Stand-In). With gates at 0
    the video tokens compute exactly the base attention, and the reference tokens never depend on
    the video (so the same photos give the same reference keys at every denoising step).
    """

    def __init__(self, mode: str, dim: int, heads: int, lora_rank: int):
        super().__init__()
        if mode not in ("joint", "gated"):
            raise ValueError(f"reference attention must be joint or gated, got {mode!r}")
        self.mode = mode
        if mode == "gated":
            self.gate = nn.Parameter(torch.zeros(heads))
            self.lora_q, self.lora_k, self.lora_v = (LowRank(dim, dim, lora_rank) for _ in range(3))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        freqs_cos, freqs_sin, reference_keys = rotary_emb
        video_len = hidden_states.shape[1] - reference_keys.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.mode == "gated":
            references = hidden_states[:, video_len:]
            pad = (0, 0, video_len, 0)  # LoRA deltas on the reference rows only
            query = query + F.pad(self.lora_q(references), pad)
            key = key + F.pad(self.lora_k(references), pad)
            value = value + F.pad(self.lora_v(references), pad)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        query = apply_rotary_emb(query, freqs_cos, freqs_sin)
        key = apply_rotary_emb(key, freqs_cos, freqs_sin)
        if self.mode == "joint":  # always masked: no data-dependent branch for torch.compile
            out = _attend(query, key, value, F.pad(reference_keys, (video_len, 0), value=True))
        else:
            out = self._gated(query, key, value, video_len, reference_keys)
        out = out.flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))

    def _gated(self, query, key, value, video_len: int, reference_keys: torch.Tensor) -> torch.Tensor:
        has_reference = reference_keys.any(dim=1)
        # A sample without references attends to its (meaningless) reference rows instead of to
        # nothing, which would be NaN; has_reference then zeroes what that contributes.
        keys_or_all = reference_keys | ~has_reference[:, None]
        ref_k, ref_v = key[:, video_len:], value[:, video_len:]
        video_q = query[:, :video_len]
        video = _attend(video_q, key[:, :video_len], value[:, :video_len])
        from_reference = _attend(video_q, ref_k, ref_v, keys_or_all)
        weight = self.gate.view(1, 1, -1, 1) * has_reference.view(-1, 1, 1, 1).to(self.gate.dtype)
        reference = _attend(query[:, video_len:], ref_k, ref_v, keys_or_all)
        return torch.cat([video + weight.to(video.dtype) * from_reference, reference], dim=1)


def _public_config(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


class ProductWanTransformer(ModelMixin, ConfigMixin):
    """Wan DiT taking (B, 36, T', h, w) + text embeddings + (B, K, dim) product tokens."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["WanTransformerBlock"]
    _keep_in_fp32_modules = WanTransformer3DModel._keep_in_fp32_modules
    _skip_layerwise_casting_patterns = WanTransformer3DModel._skip_layerwise_casting_patterns

    @register_to_config
    def __init__(
        self,
        wan_config: dict,
        num_product_tokens: int = 64,
        inject_layers: str | list[int] = "all",
        product_attention_heads: int | None = None,
        base_model: str | None = None,
        reference: str = "clip",
        reference_attention: str = "joint",
        reference_lora_rank: int = 16,
    ):
        """wan_config: the base WanTransformer3DModel config (16 input channels);
        product_attention_heads: heads of Wan's head_dim in each product attention (None: as many
        as the DiT; fewer keep adapters small, see docs/model.md);
        base_model: hub id/folder the base was loaded from (needed to load adapter checkpoints);
        reference / reference_attention / reference_lora_rank: models.config.ModelConfig's."""
        super().__init__()
        if wan_config.get("added_kv_proj_dim") or wan_config.get("image_dim"):
            raise ValueError(
                "base must be a Wan text-to-video transformer (no image context); "
                "I2V checkpoints pack their own image tokens into attn2"
            )
        if wan_config.get("in_channels", LATENT_CHANNELS) != LATENT_CHANNELS:
            raise ValueError(
                f"base transformer must take {LATENT_CHANNELS} input channels, got {wan_config.get('in_channels')}"
            )
        if reference not in ("latents", "clip", "both"):
            raise ValueError(f"reference must be latents, clip or both, got {reference!r}")
        self.wan = WanTransformer3DModel.from_config(wan_config)
        self._attach_product_layers()

    @property
    def uses_reference_latents(self) -> bool:
        return self.config.reference in ("latents", "both")

    @property
    def uses_product_tokens(self) -> bool:
        return self.config.reference in ("clip", "both")

    @property
    def injected_layers(self) -> list[int]:
        num_layers = len(self.wan.blocks)
        if self.config.inject_layers == "all":
            return list(range(num_layers))
        layers = sorted(self.config.inject_layers)
        if layers and layers[-1] >= num_layers:
            raise ValueError(f"inject_layers {layers} out of range for {num_layers} blocks")
        return layers

    @property
    def inner_dim(self) -> int:
        return self.wan.config.num_attention_heads * self.wan.config.attention_head_dim

    def _attach_product_layers(self):
        """Widen the patch embedding (new channels zero) and install the reference / product processors."""
        old = self.wan.patch_embedding
        widened = nn.Conv3d(
            old.in_channels + CONDITION_CHANNELS,
            old.out_channels,
            old.kernel_size,
            stride=old.stride,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        with torch.no_grad():
            widened.weight.zero_()
            widened.weight[:, : old.in_channels].copy_(old.weight)
            widened.bias.copy_(old.bias)
        self.wan.patch_embedding = widened
        self.wan.register_to_config(in_channels=widened.in_channels)
        if self.uses_reference_latents:
            for block in self.wan.blocks:
                processor = ReferenceAttnProcessor(
                    self.config.reference_attention,
                    self.inner_dim,
                    self.wan.config.num_attention_heads,
                    self.config.reference_lora_rank,
                )
                block.attn1.set_processor(processor.to(old.weight.device, old.weight.dtype))
        if not self.uses_product_tokens:
            return
        heads = self.config.product_attention_heads or self.wan.config.num_attention_heads
        for index in self.injected_layers:
            processor = ProductAttnProcessor(
                self.inner_dim,
                heads,
                self.wan.config.attention_head_dim,
                self.config.num_product_tokens,
                eps=self.wan.config.eps,
            )
            self.wan.blocks[index].attn2.set_processor(processor.to(old.weight.device, old.weight.dtype))

    @classmethod
    def from_base(
        cls,
        base_model: str,
        num_product_tokens: int = 64,
        inject_layers="all",
        product_attention_heads: int | None = None,
        torch_dtype: torch.dtype | None = None,
        **reference,
    ) -> ProductWanTransformer:
        """Load Wan from a diffusers repo/folder (subfolder transformer/) and add fresh product
        layers; `reference` holds the reference* arguments of __init__."""
        wan = WanTransformer3DModel.from_pretrained(base_model, subfolder="transformer", torch_dtype=torch_dtype)
        with torch.device("meta"):  # the skeleton's own Wan is replaced at once: don't allocate it
            model = cls(
                wan_config=_public_config(wan.config),
                num_product_tokens=num_product_tokens,
                inject_layers=inject_layers,
                product_attention_heads=product_attention_heads,
                base_model=str(base_model),
                **reference,
            )
        model.wan = wan
        model._attach_product_layers()
        return model

    def product_gate_magnitude(self) -> float:
        """Mean |gate| over the injected blocks' product attentions: 0 while the product branch
        is closed (as at initialisation), growing as training lets the photos in."""
        gates = (
            [self.wan.blocks[i].attn2.processor.gate for i in self.injected_layers] if self.uses_product_tokens else []
        )
        return float(torch.cat([g.detach().abs().flatten().float() for g in gates]).mean()) if gates else 0.0

    def reference_gate_magnitude(self) -> float | None:
        """Mean |gate| of gated reference attention (None in joint mode or without references)."""
        if not self.uses_reference_latents or self.config.reference_attention != "gated":
            return None
        return float(torch.cat([b.attn1.processor.gate.detach().abs().float() for b in self.wan.blocks]).mean())

    def reset_step_cache(self) -> None:
        """Forget what a step cache (diffusers' First Block Cache on the Wan blocks, see
        models/speed.py) remembers of earlier steps; nothing to do without one."""
        HookRegistry.check_if_exists_or_initialize(self.wan).reset_stateful_hooks()

    def adapter_parameter_names(self) -> list[str]:
        """Names of the weights the base checkpoint does not have (what a stage-1 adapter holds)."""
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith("wan.patch_embedding.") or ".processor." in name
        ]

    def save_adapter(self, folder: str | Path) -> None:
        """Save only the new weights + a config naming the base: megabytes, not gigabytes."""
        if not self.config.base_model:
            raise ValueError("cannot save an adapter without config.base_model (where to load the base)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        save_file(
            {name: state[name].contiguous() for name in self.adapter_parameter_names()},
            str(folder / ADAPTER_WEIGHTS_NAME),
        )
        config = {key: value for key, value in _public_config(self.config).items() if key != "wan_config"}
        (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """A full save (config.json + safetensors) loads as any diffusers model; an adapter folder
        (adapter_config.json) loads its base_model first, then the adapter weights on top."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        if not (folder / ADAPTER_CONFIG_NAME).is_file():
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
        layers = {key: value for key, value in config.items() if key != "base_model"}
        model = cls.from_base(config["base_model"], torch_dtype=kwargs.get("torch_dtype"), **layers)
        weights = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
        expected = set(model.adapter_parameter_names())
        if set(weights) != expected:
            raise ValueError(
                f"{folder}: adapter weights do not match this model: missing "
                f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}"
            )
        model.load_state_dict(weights, strict=False)
        return model

    def forward(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states,
        product_tokens=None,
        reference_latents=None,
        reference_keys=None,
        return_dict: bool = True,
    ):
        """hidden_states (B, 36, T', h, w); timestep (B,) in [0, 1000]; encoder_hidden_states
        (B, L, text_dim) UMT5 embeddings; product_tokens (B, K, inner_dim), zeros = no product
        (`clip`, `both`); reference_latents (B, N, 16, h, w) clean photo latents and
        reference_keys (B, N) bool, False = no photo in that slot (`latents`, `both`).

        Mirrors WanTransformer3DModel.forward (Wan2.1 path: one timestep per sample), except that
        reference frames follow the video in time with timestep 0, and injected blocks see the
        embedded text followed by the product tokens. Returns the video frames only.
        """
        wan = self.wan
        if hidden_states.shape[1] != wan.config.in_channels:
            raise ValueError(f"expected {wan.config.in_channels} input channels, got {hidden_states.shape[1]}")
        self._check_conditions(product_tokens, reference_latents, reference_keys)
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = wan.config.patch_size
        video_tokens = frames // p_t * (height // p_h) * (width // p_w)

        if self.uses_reference_latents:
            hidden_states = torch.cat([hidden_states, reference_frames(reference_latents, hidden_states)], dim=2)
        freqs_cos, freqs_sin = wan.rope(hidden_states)
        tokens = wan.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        if self.uses_reference_latents:
            # Reference tokens: timestep 0 (clean), embedded once with the video's timestep.
            both = torch.cat([timestep, torch.zeros_like(timestep)])
            temb, timestep_proj, text, _ = wan.condition_embedder(both, encoder_hidden_states, None)
            temb = temb[:batch]
            video_proj, reference_proj = timestep_proj.unflatten(1, (6, -1)).chunk(2)
            reference_count = tokens.shape[1] - video_tokens
            timestep_proj = torch.cat(
                [
                    video_proj[:, None].expand(-1, video_tokens, -1, -1),
                    reference_proj[:, None].expand(-1, reference_count, -1, -1),
                ],
                dim=1,
            )
            keys = reference_keys.repeat_interleave(reference_count // reference_keys.shape[1], dim=1)
            rotary_emb = (freqs_cos, freqs_sin, keys)
        else:
            temb, timestep_proj, text, _ = wan.condition_embedder(timestep, encoder_hidden_states, None)
            timestep_proj = timestep_proj.unflatten(1, (6, -1))
            rotary_emb = (freqs_cos, freqs_sin)
        with_product = torch.cat([text, product_tokens.to(text.dtype)], dim=1) if self.uses_product_tokens else text

        injected = set(self.injected_layers) if self.uses_product_tokens else set()
        checkpointing = torch.is_grad_enabled() and wan.gradient_checkpointing
        for index, block in enumerate(wan.blocks):
            context = with_product if index in injected else text
            if checkpointing:
                tokens = wan._gradient_checkpointing_func(block, tokens, context, timestep_proj, rotary_emb)
            else:
                tokens = block(tokens, context, timestep_proj, rotary_emb)

        tokens = tokens[:, :video_tokens]
        shift, scale = (wan.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (wan.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = wan.proj_out(tokens)
        tokens = tokens.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        output = tokens.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _check_conditions(self, product_tokens, reference_latents, reference_keys) -> None:
        if self.uses_product_tokens and (
            product_tokens is None or product_tokens.shape[1:] != (self.config.num_product_tokens, self.inner_dim)
        ):
            raise ValueError(
                f"reference {self.config.reference!r} needs product_tokens of shape "
                f"(B, {self.config.num_product_tokens}, {self.inner_dim}), got "
                f"{None if product_tokens is None else tuple(product_tokens.shape)}"
            )
        if self.uses_reference_latents and (
            reference_latents is None or reference_keys is None or reference_latents.shape[:2] != reference_keys.shape
        ):
            raise ValueError(
                f"reference {self.config.reference!r} needs reference_latents (B, N, 16, h, w) and "
                f"reference_keys (B, N)"
            )


def reference_frames(reference_latents: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N, 16, h, w) photo latents -> (B, 36, N, h, w) DiT input frames: the latent in the z_t
    slot (a clean frame), no masked-video latent, no mask."""
    latents = reference_latents.transpose(1, 2).to(like.dtype)
    return torch.cat([latents, latents.new_zeros(latents.shape[0], CONDITION_CHANNELS, *latents.shape[2:])], dim=1)


class ProductVideoGenerator(nn.Module):
    """The trainable pair: product DiT + product encoder (the CLIP resampler; None when the photos
    come in as reference latents alone). Training calls `forward`, the pipeline uses the parts;
    checkpoints are folders with transformer/ and, with a product encoder, product_encoder/."""

    def __init__(self, transformer: ProductWanTransformer, product_encoder: ProductEncoder | None):
        super().__init__()
        if transformer.uses_product_tokens != (product_encoder is not None):
            raise ValueError(
                f"reference {transformer.config.reference!r}: a product encoder is needed exactly when "
                "CLIP product tokens are used (clip, both)"
            )
        self.transformer = transformer
        self.product_encoder = product_encoder

    @classmethod
    def from_model_config(cls, cfg, torch_dtype: torch.dtype | None = None) -> ProductVideoGenerator:
        """Base Wan weights + fresh product layers (the product encoder sized from the configured
        image encoder)."""
        transformer = ProductWanTransformer.from_base(
            cfg.base_model,
            cfg.num_product_tokens,
            cfg.inject_layers,
            cfg.product_attention_heads,
            torch_dtype=torch_dtype,
            reference=cfg.reference,
            reference_attention=cfg.reference_attention,
            reference_lora_rank=cfg.reference_lora_rank,
        )
        if not transformer.uses_product_tokens:
            return cls(transformer, None)
        from transformers import CLIPVisionConfig

        image_config = CLIPVisionConfig.from_pretrained(cfg.image_encoder, subfolder=cfg.image_encoder_subfolder)
        product_encoder = ProductEncoder(
            image_dim=image_config.hidden_size,
            hidden_dim=cfg.product_hidden_dim,
            num_tokens=cfg.num_product_tokens,
            num_heads=cfg.product_num_heads,
            output_dim=transformer.inner_dim,
        )
        return cls(transformer, product_encoder if torch_dtype is None else product_encoder.to(dtype=torch_dtype))

    def save_pretrained(self, folder: str | Path, adapter_only: bool = False) -> None:
        """adapter_only: the transformer keeps only its new weights (stage 1); the product
        encoder is always saved whole (it is all trainable and small)."""
        folder = Path(folder)
        if adapter_only:
            self.transformer.save_adapter(folder / "transformer")
        else:
            self.transformer.save_pretrained(folder / "transformer")
        if self.product_encoder is not None:
            self.product_encoder.save_pretrained(folder / "product_encoder")

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> ProductVideoGenerator:
        transformer = ProductWanTransformer.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype)
        product_encoder = (
            ProductEncoder.from_pretrained(folder, subfolder="product_encoder", torch_dtype=torch_dtype)
            if transformer.uses_product_tokens
            else None
        )
        return cls(transformer, product_encoder)

    def forward(
        self,
        noisy_latents,
        masked_latents,
        packed_mask,
        timestep,
        text_embeds,
        image_tokens=None,
        image_mask=None,
        reference_latents=None,
        photo_mask=None,
        keep_text=None,
        keep_product=None,
    ) -> torch.Tensor:
        """Predicted velocity (B, 16, T', h, w). image_tokens (B, N, L, D) + image_mask (B, N): the
        photos' CLIP tokens (clip, both); reference_latents (B, N, 16, h, w) + photo_mask (B, N):
        their VAE latents (latents, both). keep_text/keep_product (B,) in {0, 1} drop a sample's
        text (zero embeddings) / product (zero product tokens, no reference tokens): the null
        conditions of guidance."""
        product = reference_keys = None
        if self.product_encoder is not None:
            product = self.product_encoder(image_tokens, image_mask)
            if keep_product is not None:
                product = product * keep_product.view(-1, 1, 1).to(product.dtype)
        if (
            self.transformer.uses_reference_latents and photo_mask is not None
        ):  # else the transformer says what is missing
            reference_keys = photo_mask.bool()
            if keep_product is not None:
                reference_keys = reference_keys & keep_product.view(-1, 1).bool()
        if keep_text is not None:
            text_embeds = text_embeds * keep_text.view(-1, 1, 1).to(text_embeds.dtype)
        dit_input = build_dit_input(noisy_latents, masked_latents, packed_mask)
        return self.transformer(
            dit_input, timestep, text_embeds, product, reference_latents, reference_keys, return_dict=False
        )[0]
