"""The product DiT: function preservation against plain diffusers Wan, exact null product,
shapes over frame counts, layer subsets, and the full/adapter save-load round trips."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from models.spec import specification
from models.tiny import TINY_TEXT_DIM
from models.transformer import ADAPTER_WEIGHTS_NAME, ProductWanTransformer, build_dit_input, pack_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


K = 8  # tiny.yaml num_product_tokens


def inputs(batch=2, latent_frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, 16, latent_frames, 4, 6, generator=g)
    z_masked = torch.randn(batch, 16, latent_frames, 4, 6, generator=g)
    packed = torch.rand(batch, 4, latent_frames, 4, 6, generator=g)
    text = torch.randn(batch, 16, TINY_TEXT_DIM, generator=g)
    product = torch.randn(batch, K, 32, generator=g)
    timestep = torch.tensor([900.0, 250.0][:batch])
    return z_t, z_masked, packed, text, product, timestep


def randomize_new_weights(model: ProductWanTransformer, seed=1):
    """Stand-in for training: every adapter weight (gates, new channels) becomes non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in model.adapter_parameter_names():
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.1)


def test_initial_model_is_the_plain_wan_function(tiny_cfg):
    plain = WanTransformer3DModel.from_pretrained(tiny_cfg.base_model, subfolder="transformer").eval()
    model = ProductWanTransformer.from_base(tiny_cfg.base_model, num_product_tokens=K, product_attention_heads=1).eval()
    assert model.wan.config.in_channels == 36 and plain.config.in_channels == 16
    z_t, z_masked, packed, text, product, timestep = inputs()
    with torch.no_grad():
        expected = plain(z_t, timestep, text, return_dict=False)[0]
        got = model(build_dit_input(z_t, z_masked, packed), timestep, text, product, return_dict=False)[0]
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        # The comparison can fail: opening the gates changes the output.
        for block in model.wan.blocks:
            block.attn2.processor.gate.fill_(1.0)
        changed = model(build_dit_input(z_t, z_masked, packed), timestep, text, product, return_dict=False)[0]
        assert not torch.allclose(changed, expected, atol=1e-3)


def test_zero_product_tokens_contribute_exactly_nothing(tiny_cfg):
    model = ProductWanTransformer.from_base(tiny_cfg.base_model, num_product_tokens=K).eval()
    randomize_new_weights(model)
    z_t, z_masked, packed, text, product, timestep = inputs()
    x = build_dit_input(z_t, z_masked, packed)
    with torch.no_grad():
        with_null = model(x, timestep, text, torch.zeros_like(product), return_dict=False)[0]
        for block in model.wan.blocks:
            block.attn2.processor.gate.zero_()
        gates_closed = model(x, timestep, text, product, return_dict=False)[0]
    assert torch.equal(with_null, gates_closed)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_output_shape_for_4k_plus_1_frames(tiny_cfg, frames):
    model = ProductWanTransformer.from_base(tiny_cfg.base_model, num_product_tokens=K).eval()
    latent_frames = (frames - 1) // 4 + 1
    z_t, z_masked, _, text, product, timestep = inputs(latent_frames=latent_frames)
    packed = pack_mask(torch.ones(2, 1, frames, 32, 48), (4, 6))
    with torch.no_grad():
        out = model(build_dit_input(z_t, z_masked, packed), timestep, text, product).sample
    assert out.shape == z_t.shape


def test_inject_layer_subset(tiny_cfg):
    model = ProductWanTransformer.from_base(tiny_cfg.base_model, num_product_tokens=K, inject_layers=[1])
    assert model.injected_layers == [1]
    assert not any(".blocks.0.attn2.processor." in n for n in model.adapter_parameter_names())
    randomize_new_weights(model)
    z_t, z_masked, packed, text, product, timestep = inputs()
    with torch.no_grad():  # block 0 gets text only, block 1 text + product
        out = model(build_dit_input(z_t, z_masked, packed), timestep, text, product).sample
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="out of range"):
        ProductWanTransformer.from_base(tiny_cfg.base_model, num_product_tokens=K, inject_layers=[5])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg):
    model = ProductWanTransformer.from_base(tiny_cfg.base_model, num_product_tokens=K)
    randomize_new_weights(model)
    z_t, z_masked, packed, text, product, timestep = inputs()
    x = build_dit_input(z_t, z_masked, packed)

    def grads():
        model.zero_grad()
        model(x, timestep, text, product).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        assert torch.allclose(a, b, atol=1e-6)


def directory_bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize(
    "reference,attention", [("clip", "joint"), ("latents", "gated"), ("latents", "joint"), ("both", "gated")]
)
def test_full_and_adapter_round_trips(tiny_cfg, tmp_path, reference, attention):
    cfg = tiny_cfg.model_copy(update={"reference": reference, "reference_attention": attention})
    spec = specification(cfg)
    generator = spec.build_generator().eval()
    randomize_new_weights(generator.transformer)
    spec.save_generator(generator, tmp_path / "full", adapter_only=False)
    spec.save_generator(generator, tmp_path / "adapter", adapter_only=True)
    assert (tmp_path / "full/transformer/config.json").is_file()
    assert (tmp_path / "adapter/transformer" / ADAPTER_WEIGHTS_NAME).is_file()
    assert (tmp_path / "full/product_encoder").is_dir() == (reference != "latents")

    z_t, z_masked, packed, text, _, timestep = inputs()
    photo_mask = torch.tensor([[True, False, False], [True, True, True]])
    batch = {
        "masked_latents": z_masked,
        "packed_mask": packed,
        "text_embeds": text,
        "photo_mask": photo_mask,
        "image_tokens": torch.randn(2, 3, 17, 32),
        "reference_latents": torch.randn(2, 3, 16, 4, 6),
    }
    with torch.no_grad():
        expected = spec.predict(generator, batch, z_t, timestep)
        for kind in ("full", "adapter"):
            loaded = spec.load_generator(tmp_path / kind).eval()
            got = spec.predict(loaded, batch, z_t, timestep)
            assert torch.equal(got, expected), kind
            assert loaded.transformer.config.reference == reference
    assert expected.shape == z_t.shape

    adapter_transformer = directory_bytes(tmp_path / "adapter/transformer")
    full_transformer = directory_bytes(tmp_path / "full/transformer")
    assert adapter_transformer < full_transformer / 2


def test_adapter_rejects_mismatched_weights(tiny_cfg, tmp_path):
    model = ProductWanTransformer.from_base(tiny_cfg.base_model, num_product_tokens=K, inject_layers=[0])
    model.save_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        (tmp_path / "adapter_config.json").read_text().replace("[\n    0\n  ]", '"all"')
    )
    with pytest.raises(ValueError, match="do not match"):
        ProductWanTransformer.from_pretrained(tmp_path)
