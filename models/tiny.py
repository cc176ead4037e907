"""Tiny random components with the real classes, for CPU tests and the demo.

No weights can be downloaded here, so tests build these, save them as a diffusers-style model
folder (transformer/, vae/, text_encoder/, tokenizer/, image_encoder/, image_processor/,
scheduler/) and load them back through the same `from_pretrained` code users run on
Wan-AI/Wan2.1-T2V-1.3B-Diffusers. Shapes are the real architecture's, only smaller: the VAE keeps
z_dim 16 (Wan's latents_mean/std have 16 entries) and its 8x/4x down-sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel, WanVACETransformer3DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from models.config import TINY, ModelConfig

TINY_TEXT_DIM = 32
# SAM2.1 hiera-tiny (a config of the sam2 package), shrunk by hydra overrides: small enough to
# build on a CPU in tests and in benchmarks/gpu_segmentation.py --tiny.
TINY_SAM2 = "configs/sam2.1/sam2.1_hiera_t.yaml"
TINY_SAM2_OVERRIDES = [
    "++model.image_size=128",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
]
TINY_IMAGE_SIZE = 32
TINY_VOCAB = (
    "a an the and with on in of product video bottle bag watch ring shoe red blue green "
    "silver gold black white wooden table hand turning slowly close up shot bright studio"
).split()


def tiny_transformer() -> WanTransformer3DModel:
    """Wan2.1 T2V layout: 2 blocks, 2 heads x 16, text_dim 32 (1.3B: 30 blocks, 12 x 128, 4096)."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def tiny_vace_transformer() -> WanVACETransformer3DModel:
    """Wan2.1-VACE layout on tiny_transformer's blocks: a VACE block at both (1.3B: at 15 of 30),
    96 control channels (32 video latents + 64 unshuffled mask), as the real checkpoints."""
    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
        vace_layers=[0, 1],
        vace_in_channels=96,
    )


def tiny_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_text_encoder() -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=len(TINY_VOCAB) + 3,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with T5's special-token ids (pad 0, eos 1, unk 2), built offline."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(TINY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_image_encoder() -> CLIPVisionModel:
    return CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
        )
    )


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )


def flow_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    """The scheduler Wan2.1's diffusers repos ship: UniPC on flow sigmas."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    )


def save_tiny(folder: str | Path, backend: str = "product", seed: int = 0) -> Path:
    """Write the tiny model folder of a backend (models/spec.py) and return it: transformer/ (Wan
    T2V, or VACE for `vace`), vae/, text_encoder/, tokenizer/, scheduler/, and for the product
    backend image_encoder/ + image_processor/ (its CLIP path), as the Wan-AI diffusers repos lay
    them out."""
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        (tiny_vace_transformer() if backend == "vace" else tiny_transformer()).save_pretrained(folder / "transformer")
        tiny_vae().save_pretrained(folder / "vae")
        tiny_text_encoder().save_pretrained(folder / "text_encoder")
        if backend == "product":
            tiny_image_encoder().save_pretrained(folder / "image_encoder")
    if backend == "product":
        tiny_image_processor().save_pretrained(folder / "image_processor")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    flow_scheduler(3.0).save_pretrained(folder / "scheduler")
    return folder


def tiny_folder_name(backend: str) -> str:
    return TINY if backend == "product" else f"{TINY}-{backend}"


def materialize_tiny(cfg: ModelConfig, folder: str | Path) -> ModelConfig:
    """For a `base_model: tiny` config, save tiny components to `folder` and point the config at it."""
    if cfg.base_model != TINY:
        return cfg
    save_tiny(folder, cfg.backend)
    return cfg.model_copy(update={"base_model": str(folder), "image_encoder": str(folder)})
