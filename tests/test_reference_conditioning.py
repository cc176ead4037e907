"""Reference latents inside self-attention (models/transformer.py, ReferenceAttnProcessor): the
gated mode is the base T2V function until its gates open, reference tokens are clean (timestep 0)
and never reach the output, and the photos' latents do reach the video once the path is open."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from models.tiny import TINY_TEXT_DIM
from models.transformer import ProductWanTransformer, build_dit_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(seed=0, photos=3):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(2, 16, 2, 4, 6, generator=g)
    x = build_dit_input(z_t, torch.randn(2, 16, 2, 4, 6, generator=g), torch.rand(2, 4, 2, 4, 6, generator=g))
    text = torch.randn(2, 16, TINY_TEXT_DIM, generator=g)
    references = torch.randn(2, photos, 16, 4, 6, generator=g)
    keys = torch.tensor([[True, True, False], [True, False, False]])[:, :photos]
    return z_t, x, torch.tensor([900.0, 250.0]), text, references, keys


def reference_model(tiny_cfg, attention):
    return ProductWanTransformer.from_base(
        tiny_cfg.base_model, reference="latents", reference_attention=attention
    ).eval()


def test_gated_reference_attention_at_gates_zero_is_the_base_t2v_model(tiny_cfg):
    plain = WanTransformer3DModel.from_pretrained(tiny_cfg.base_model, subfolder="transformer").eval()
    model = reference_model(tiny_cfg, "gated")
    z_t, x, timestep, text, references, keys = inputs()
    with torch.no_grad():
        expected = plain(z_t, timestep, text, return_dict=False)[0]
        # LoRA weights trained away from zero change nothing while the gates are closed.
        for block in model.wan.blocks:
            torch.nn.init.normal_(block.attn1.processor.lora_k.up.weight)
        got = model(x, timestep, text, None, references, keys).sample
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for block in model.wan.blocks:
            block.attn1.processor.gate.fill_(0.5)
        opened = model(x, timestep, text, None, references, keys).sample
        without_photos = model(x, timestep, text, None, references, torch.zeros_like(keys)).sample
    assert not torch.allclose(opened, expected, atol=1e-3)
    torch.testing.assert_close(without_photos, expected, atol=1e-5, rtol=1e-5)  # no photo: exactly the base


@pytest.mark.parametrize("attention", ["joint", "gated"])
def test_reference_tokens_reach_the_video_and_only_valid_photos_count(tiny_cfg, attention):
    model = reference_model(tiny_cfg, attention)
    if attention == "gated":
        with torch.no_grad():
            for block in model.wan.blocks:
                block.attn1.processor.gate.fill_(1.0)
    z_t, x, timestep, text, references, keys = inputs()
    with torch.no_grad():
        base = model(x, timestep, text, None, references, keys).sample
        other_photos = references.clone()
        other_photos[0, 0] += 1.0  # a valid photo of sample 0
        changed = model(x, timestep, text, None, other_photos, keys).sample
        padded_slot = references.clone()
        padded_slot[0, 2] += 1.0  # slot 2 of sample 0 holds no photo
        unchanged = model(x, timestep, text, None, padded_slot, keys).sample
    assert base.shape == z_t.shape  # reference frames are not part of the output (nor of the loss)
    assert not torch.allclose(changed[0], base[0], atol=1e-4)
    torch.testing.assert_close(changed[1], base[1])  # the photos of one sample do not leak into another
    torch.testing.assert_close(unchanged, base, atol=1e-6, rtol=1e-6)


def test_gradients_reach_the_reference_path_and_references_get_timestep_zero(tiny_cfg, monkeypatch):
    model = reference_model(tiny_cfg, "gated").train()
    z_t, x, timestep, text, references, keys = inputs()
    seen = []
    embed = model.wan.condition_embedder.forward
    monkeypatch.setattr(
        model.wan.condition_embedder,
        "forward",
        lambda t, *rest, **kw: seen.append(t.detach().clone()) or embed(t, *rest, **kw),
    )
    model(x, timestep, text, None, references, keys).sample.square().mean().backward()
    assert torch.equal(seen[0], torch.tensor([900.0, 250.0, 0.0, 0.0]))  # video timesteps, then 0 for references
    gates = [block.attn1.processor.gate.grad for block in model.wan.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in gates)  # the closed gates still learn to open


def test_reference_attention_is_computed_the_same_with_checkpointing(tiny_cfg):
    model = reference_model(tiny_cfg, "joint").train()
    z_t, x, timestep, text, references, keys = inputs()

    def grads():
        model.zero_grad()
        model(x, timestep, text, None, references, keys).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_missing_condition_is_a_clear_error(tiny_cfg):
    model = reference_model(tiny_cfg, "joint")
    _, x, timestep, text, _, _ = inputs()
    with pytest.raises(ValueError, match="reference_latents"):
        model(x, timestep, text)
