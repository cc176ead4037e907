"""The vace backend on a tiny Wan2.1-VACE folder saved with save_pretrained and loaded back as a user's."""

import numpy as np
import pytest
import torch
from diffusers import WanVACETransformer3DModel

from models.config import ModelConfig
from models.spec import specification
from models.tiny import save_tiny
from models.vace import LORA_FOLDER, TRANSFORMER_FOLDER, VaceGenerator, VaceSpecification, reference_canvas

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEIGHT, WIDTH, FRAMES = 32, 48, 5
PROMPT = "a red bottle on a wooden table"


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("tiny_vace"), "vace")
    cfg = ModelConfig(
        backend="vace", base_model=str(folder), image_encoder=str(folder), text_max_length=16, reference_lora_rank=4
    )
    return VaceSpecification(cfg)


@pytest.fixture(scope="module")
def encoders(spec):
    return spec.load_encoders(torch.device("cpu"), torch.float32)


def clip_window(seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(3, FRAMES, HEIGHT, WIDTH, generator=g)
    mask = torch.zeros(1, FRAMES, HEIGHT, WIDTH)
    mask[..., 8:24, 16:32] = 1
    return video, mask


def photos():
    rng = np.random.default_rng(0)
    cutout = rng.integers(0, 255, (20, 10, 4), dtype=np.uint8)
    cutout[..., 3] = 255
    cutout[:5, :, 3] = 0  # a transparent band
    return [cutout, rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def batch(spec, encoders):
    """Two samples: the first with both photos, the second with the second photo only (padded)."""
    video, mask = clip_window()
    clip = spec.encode_clip(encoders, video, mask, PROMPT)
    product = spec.encode_product(encoders, photos(), HEIGHT, WIDTH)
    one = {"reference_latents": product["reference_latents"][1:]}
    return spec.collate([clip | product, clip | one])


def predict(spec, generator, batch, seed=0, **keep):
    torch.manual_seed(seed)  # the reference slots' noise
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    return spec.predict(generator, batch, noisy, torch.tensor([700.0, 300.0])[: len(noisy)], **keep)


def randomize_lora(generator, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.5)


def test_tiny_vace_folder_loads_through_the_users_path(spec):
    assert isinstance(specification(spec.cfg), VaceSpecification)
    generator = spec.build_generator()
    plain = WanVACETransformer3DModel.from_pretrained(spec.cfg.base_model, subfolder="transformer")
    assert isinstance(generator.transformer, WanVACETransformer3DModel)
    assert list(generator.transformer.config.vace_layers) == [0, 1]
    assert torch.equal(
        generator.transformer.state_dict()["blocks.1.ffn.net.0.proj.weight"],
        plain.state_dict()["blocks.1.ffn.net.0.proj.weight"],
    )
    lora = spec.adapter_names(generator)
    assert any(name.startswith("transformer.vace_blocks.") for name in lora)
    assert any(".attn2.to_out.0.lora_B." in name for name in lora)


def test_untrained_lora_is_exactly_zero_shot_vace(spec, batch):
    generator = spec.build_generator()
    zero_shot = VaceGenerator(WanVACETransformer3DModel.from_pretrained(spec.cfg.base_model, subfolder="transformer"))
    assert torch.equal(predict(spec, generator, batch), predict(spec, zero_shot, batch))
    randomize_lora(generator)
    assert not torch.allclose(predict(spec, generator, batch), predict(spec, zero_shot, batch))


def test_predict_returns_the_video_frames_and_trains_the_lora(spec, batch):
    generator = spec.build_generator()
    velocity = predict(spec, generator, batch)
    assert velocity.shape == batch["latents"].shape  # the reference frames are stripped
    velocity.square().mean().backward()
    gradients = {name: p.grad for name, p in generator.named_parameters() if p.grad is not None}
    lora_b = {name for name in spec.adapter_names(generator) if ".lora_B." in name}
    assert lora_b and lora_b <= set(gradients)
    assert all(gradients[name].abs().sum() > 0 for name in lora_b)
    assert set(gradients) <= spec.adapter_names(generator)  # the base stays frozen


def test_no_product_is_vace_without_references_and_padding_is_not_seen(spec, batch):
    generator = spec.build_generator()
    no_photos = batch | {
        "reference_latents": batch["reference_latents"][:, :0],
        "photo_mask": batch["photo_mask"][:, :0],
    }
    dropped = predict(spec, generator, batch, keep_product=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(dropped[0], predict(spec, generator, no_photos)[0])  # batch of 1 vs 2: rounding
    assert not torch.allclose(dropped[0], predict(spec, generator, batch)[0])  # the photos condition VACE
    # The second sample alone with its one photo: its padded slot changes nothing.
    torch.manual_seed(0)
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    alone = {key: value[1:] for key, value in batch.items()}
    alone |= {"reference_latents": alone["reference_latents"][:, :1], "photo_mask": alone["photo_mask"][:, :1]}
    assert torch.equal(dropped[1], spec.predict(generator, alone, noisy[1:], torch.tensor([300.0]))[0])


def test_text_dropout_is_zero_text(spec, batch):
    generator = spec.build_generator()
    dropped = predict(spec, generator, batch, keep_text=torch.tensor([0.0, 1.0]))
    zero_text = batch | {"text_embeds": batch["text_embeds"] * torch.tensor([0.0, 1.0]).view(-1, 1, 1)}
    assert torch.equal(dropped, predict(spec, generator, zero_text))
    assert not torch.allclose(dropped[0], predict(spec, generator, batch)[0])


def test_trainable_names_per_stage(spec):
    generator = spec.build_generator()
    everything = {name for name, _ in generator.named_parameters()}
    adapter = spec.trainable_names(generator, "adapter")
    assert adapter == spec.adapter_names(generator) and adapter
    assert all(".lora_A." in name or ".lora_B." in name for name in adapter)
    assert spec.trainable_names(generator, "full") == everything == spec.trainable_names(generator, "scratch")
    assert "transformer.blocks.0.ffn.net.0.proj.weight" in everything - adapter
    with pytest.raises(ValueError, match="unknown training stage"):
        spec.trainable_names(generator, "stage1")


@pytest.mark.parametrize("adapter_only", [True, False])
def test_save_load_round_trip_reproduces_predict(spec, batch, tmp_path, adapter_only):
    generator = spec.build_generator()
    randomize_lora(generator)
    with torch.no_grad():
        generator.transformer.blocks[0].ffn.net[2].weight.add_(0.1)  # a trained base weight (full saves keep it)
    spec.save_generator(generator, tmp_path, adapter_only=adapter_only)
    assert (tmp_path / LORA_FOLDER).is_dir()
    assert (tmp_path / TRANSFORMER_FOLDER).is_dir() != adapter_only
    loaded = spec.load_generator(tmp_path)
    if adapter_only:  # the base comes from the config: the LoRA alone is what the folder holds
        fresh = spec.build_generator()
        fresh.load_state_dict(
            {name: value for name, value in generator.state_dict().items() if ".lora_" in name}, strict=False
        )
        assert torch.equal(predict(spec, loaded, batch), predict(spec, fresh, batch))
        assert not torch.allclose(predict(spec, loaded, batch), predict(spec, generator, batch))
    else:
        assert torch.equal(predict(spec, loaded, batch), predict(spec, generator, batch))
    assert spec.adapter_names(loaded) == spec.adapter_names(generator)


def test_encode_clip_and_product(spec, encoders, batch):
    video, mask = clip_window()
    clip = spec.encode_clip(encoders, video, mask, PROMPT)
    assert clip["latents"].shape == (16, 2, HEIGHT // 8, WIDTH // 8)
    assert clip["control_latents"].shape == (96, 2, HEIGHT // 8, WIDTH // 8)  # 32 latents + 64 unshuffled mask
    assert clip["text_embeds"].shape == (16, 32)
    assert clip["control_latents"][32:].sum() == 16 * 16 * 2  # 16x16 mask px on frame 0 and latent frame 1
    other_inside = torch.where(mask.bool(), torch.rand_like(video), video)
    other_outside = torch.where(mask.bool(), video, torch.rand_like(video))
    assert torch.equal(
        spec.encode_clip(encoders, other_inside, mask, PROMPT)["control_latents"], clip["control_latents"]
    )  # the region is grey whatever it held
    assert not torch.equal(
        spec.encode_clip(encoders, other_outside, mask, PROMPT)["control_latents"], clip["control_latents"]
    )
    product = spec.encode_product(encoders, photos(), HEIGHT, WIDTH)
    assert product["reference_latents"].shape == (2, 16, 1, HEIGHT // 8, WIDTH // 8)
    assert batch["reference_latents"].shape == (2, 2, 16, 1, HEIGHT // 8, WIDTH // 8)
    assert batch["photo_mask"].tolist() == [[True, True], [True, False]]
    assert torch.equal(batch["reference_latents"][1, 1], torch.zeros(16, 1, HEIGHT // 8, WIDTH // 8))


def test_reference_canvas_fits_the_photo_centred_on_white():
    cutout = photos()[0]  # 20 x 10, its top 5 rows transparent
    canvas = np.asarray(reference_canvas(cutout, HEIGHT, WIDTH))
    assert canvas.shape == (HEIGHT, WIDTH, 3)
    # Scaled 1.6x to 32 x 16, centred: columns 16..31 hold the photo, the rest is white.
    assert (canvas[:, :16] == 255).all() and (canvas[:, 32:] == 255).all()
    assert (canvas[:6, 16:32] == 255).all()  # the transparent band
    assert not (canvas[10:, 17:31] == 255).all()


def test_generation_sees_what_training_sees(spec, encoders, batch):
    """The control input and text of a pipeline call equal what predict builds from encode_clip
    and encode_product for the same clip and photos."""
    generator = spec.build_generator()
    seen = []
    hook = generator.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    video, mask = clip_window()
    spec.pipeline(generator)(
        video[None] * (1 - mask[None]), mask[None], [photos()], PROMPT, num_inference_steps=1, text_guidance_scale=1.0
    )
    single = {key: value[:1] for key, value in batch.items()}
    predict(spec, generator, single)
    hook.remove()
    generated, trained = seen[0], seen[-1]
    assert generated["control_hidden_states"].shape == (1, 96, 4, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(
        generated["control_hidden_states"], trained["control_hidden_states"], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(generated["encoder_hidden_states"], trained["encoder_hidden_states"])


def test_photos_change_the_video_and_the_outside_is_the_input(spec):
    pipe = spec.pipeline(spec.build_generator())
    video, mask = clip_window()
    masked_video, mask = (video * (1 - mask))[None].repeat(2, 1, 1, 1, 1), mask[None].repeat(2, 1, 1, 1, 1)
    steps = []

    def generate(images, **kwargs):
        return pipe(
            masked_video,
            mask,
            images,
            PROMPT,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )

    with_photos = generate([photos(), photos()[1:]], callback=lambda step, total: steps.append((step, total)))
    without = generate([[], []])
    assert with_photos.shape == (2, 3, FRAMES, HEIGHT, WIDTH)
    assert steps == [(step, 4) for step in range(1, 5)]
    inside = mask.expand_as(with_photos).bool()
    assert (with_photos[inside] - without[inside]).abs().max() > 1e-3
    assert torch.equal(with_photos[~inside], masked_video[~inside])
    assert torch.equal(without[~inside], masked_video[~inside])
    assert generate([[], []], output_type="latent").shape == (2, 16, 2, HEIGHT // 8, WIDTH // 8)
    assert generate([[], []], output_type="np").dtype == np.uint8
