"""Config files, mask packing, product encoder shapes, compositing and the guidance formula."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import ModelConfig, load_model_config
from models.pipeline import combine_guidance, composite, feather
from models.product_encoder import ProductEncoder, encode_product_images
from models.tiny import tiny_image_encoder, tiny_image_processor
from models.transformer import build_dit_input, pack_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


@pytest.mark.parametrize("name", ["tiny", "poc-1.3b", "prod-14b"])
def test_configs_load(name):
    cfg = load_model_config(CONFIGS / f"{name}.yaml")
    assert cfg.mask_packing == "temporal_fold"
    assert 1 <= cfg.num_product_tokens <= 256


def test_poc_config_has_the_seed_values():
    cfg = load_model_config(CONFIGS / "poc-1.3b.yaml")
    assert cfg.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (cfg.num_product_tokens, cfg.product_hidden_dim, cfg.inject_layers) == (64, 1024, "all")


def test_config_rejects_unknown_fields_and_bad_layers():
    with pytest.raises(ValueError):
        ModelConfig(base_model="x", image_encoder="y", num_tokens=3)
    with pytest.raises(ValueError):
        ModelConfig(base_model="x", image_encoder="y", inject_layers=[1, 1])


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_pack_mask_folds_four_frames_per_latent_frame(frames):
    mask = torch.zeros(2, 1, frames, 32, 48)
    mask[:, :, -1, :8, :8] = 1  # one 8x8 cell in the last frame
    mask[:, :, 0, 8:12, 8:16] = 1  # half of a cell in the first frame
    packed = pack_mask(mask, (4, 6))
    latent_frames = (frames - 1) // 4 + 1
    assert packed.shape == (2, 4, latent_frames, 4, 6)
    # First latent frame = the first pixel frame, repeated in all 4 channels.
    assert torch.equal(packed[:, :, 0, 1, 1], torch.full((2, 4), 0.5))
    if frames > 1:  # the last pixel frame is the 4th channel of the last latent frame
        assert packed[0, 3, -1, 0, 0] == 1 and packed[0, :3, -1, 0, 0].sum() == 0
    assert packed.sum() == pytest.approx(2 * (4 * 0.5 + (1 if frames > 1 else 4)))


def test_pack_mask_rejects_bad_frame_count():
    with pytest.raises(ValueError, match="4k\\+1"):
        pack_mask(torch.zeros(1, 1, 4, 16, 16), (2, 2))


def test_dit_input_has_36_channels_in_order():
    z_t, z_masked, packed = torch.zeros(1, 16, 2, 4, 4), torch.ones(1, 16, 2, 4, 4), torch.full((1, 4, 2, 4, 4), 2.0)
    x = build_dit_input(z_t, z_masked, packed)
    assert x.shape[1] == 36 and x[:, :16].sum() == 0 and (x[:, 16:32] == 1).all() and (x[:, 32:] == 2).all()


@pytest.mark.parametrize("num_images", [1, 2, 3, 4, 5])
def test_product_encoder_shapes_and_padding_is_ignored(num_images):
    torch.manual_seed(0)
    encoder = ProductEncoder(image_dim=12, hidden_dim=16, num_tokens=8, num_heads=4, output_dim=24).eval()
    tokens = torch.randn(2, 5, 7, 12)
    image_mask = torch.zeros(2, 5, dtype=torch.bool)
    image_mask[:, :num_images] = True
    out = encoder(tokens, image_mask)
    assert out.shape == (2, 8, 24)
    scrambled = tokens.clone()
    scrambled[:, num_images:] = torch.randn_like(scrambled[:, num_images:]) * 100  # padding content
    assert torch.allclose(encoder(scrambled, image_mask), out, atol=1e-5)
    alone = encoder(tokens[:, :num_images], image_mask[:, :num_images])  # no padding at all
    assert torch.allclose(alone, out, atol=1e-5)


def test_product_encoder_needs_one_image_per_sample():
    encoder = ProductEncoder(image_dim=12, hidden_dim=16, num_tokens=8, num_heads=4, output_dim=24)
    with pytest.raises(ValueError, match="at least one"):
        encoder(torch.randn(1, 2, 3, 12), torch.zeros(1, 2, dtype=torch.bool))


def test_encode_product_images_pads_to_largest_count():
    images = [[np.full((40, 30, 3), 60 * i, np.uint8) for i in range(count)] for count in (1, 5, 3)]
    tokens, mask = encode_product_images(tiny_image_encoder().eval(), tiny_image_processor(), images)
    assert tokens.shape == (3, 5, 17, 32)  # 32x32 / 8x8 patches + CLS, width 32
    assert mask.tolist() == [[True] + [False] * 4, [True] * 5, [True] * 3 + [False] * 2]
    assert tokens[0, 1:].abs().sum() == 0
    with pytest.raises(ValueError):
        encode_product_images(tiny_image_encoder(), tiny_image_processor(), [images[1] * 2])


@pytest.mark.parametrize("feather_px", [0, 3])
def test_composite_leaves_unmasked_pixels_exactly(feather_px):
    generator = torch.Generator().manual_seed(0)
    masked_video = torch.rand(1, 3, 5, 32, 32, generator=generator)
    mask = torch.zeros(1, 1, 5, 32, 32)
    mask[..., 10:20, 12:22] = 1
    generated = torch.rand(1, 3, 5, 32, 32, generator=generator)
    out = composite(generated, masked_video, mask, feather_px)
    region = torch.zeros_like(mask, dtype=torch.bool)  # the mask grown by feather_px (box)
    region[..., 10 - feather_px : 20 + feather_px, 12 - feather_px : 22 + feather_px] = True
    outside = ~region.expand_as(out)
    assert torch.equal(out[outside], masked_video[outside])
    inside = mask.bool().expand_as(out)
    assert torch.equal(out[inside], generated[inside])
    if feather_px:  # the ring blends, strictly between the two
        ring = region.expand_as(out) & ~inside
        alpha = feather(mask, feather_px).expand_as(out)[ring]
        assert (alpha > 0).all() and (alpha < 1).all()


def test_guidance_formula():
    full, no_product, uncond = torch.tensor(3.0), torch.tensor(2.0), torch.tensor(1.0)
    assert combine_guidance(full, None, None, 1.0, 1.0) == full
    assert combine_guidance(full, no_product, None, 1.0, 4.0) == 2 + 4 * 1
    # uncond + g_t (no_product - uncond) + g_p (full - no_product)
    assert combine_guidance(full, no_product, uncond, 5.0, 3.0) == 1 + 5 * 1 + 3 * 1
