"""The sampler end to end on tiny components: determinism, compositing, guidance branches."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import load_model_config
from models.pipeline import ProductVideoPipeline, fill_masked, photo_canvas
from models.spec import specification
from models.tiny import materialize_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """Both photo paths (CLIP tokens and gated reference latents), their gates open."""
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml")
    cfg = materialize_tiny(cfg, tmp_path_factory.mktemp("tiny_wan")).model_copy(update={"reference": "both"})
    spec = specification(cfg)
    pipe = spec.pipeline(spec.build_generator())
    with torch.no_grad():
        for block in pipe.transformer.wan.blocks:
            block.attn2.processor.gate.fill_(1.0)
            block.attn1.processor.gate.fill_(1.0)
    return pipe


def scene(batch=2, frames=5):
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (batch, 3, frames, 32, 48), generator=g).float() / 255
    mask = torch.zeros(batch, 1, frames, 32, 48)
    mask[..., 8:24, 16:40] = 1
    images = [
        [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(n)] for n in (1, 4)
    ][:batch]
    return video * (1 - mask), mask, images


def generate(pipe, seed, **kwargs):
    masked_video, mask, images = scene()
    return pipe(
        masked_video,
        mask,
        images,
        ["a red bag on a table", "a silver watch"],
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def test_same_seed_same_video_other_seed_other_video(pipe):
    first, again, other = generate(pipe, 0), generate(pipe, 0), generate(pipe, 1)
    assert first.shape == (2, 3, 5, 32, 48)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_unmasked_pixels_are_returned_exactly(pipe):
    masked_video, mask, _ = scene()
    for feather_px in (0, 2):
        video = generate(pipe, 0, feather_px=feather_px)
        outside = torch.ones_like(mask, dtype=torch.bool)
        outside[..., 8 - feather_px : 24 + feather_px, 16 - feather_px : 40 + feather_px] = False
        outside = outside.expand_as(video)
        assert torch.equal(video[outside], masked_video[outside])
    as_uint8 = generate(pipe, 0, output_type="np")
    assert as_uint8.shape == (2, 5, 32, 48, 3) and as_uint8.dtype == np.uint8
    expected = (masked_video.permute(0, 2, 3, 4, 1) * 255).round().to(torch.uint8).numpy()
    keep = (mask.permute(0, 2, 3, 4, 1) == 0).expand(-1, -1, -1, -1, 3).numpy()
    assert np.array_equal(as_uint8[keep], expected[keep])


def test_guidance_scales_change_the_result_and_one_branch_is_plain_conditioning(pipe):
    guided = generate(pipe, 0, output_type="latent")
    conditional = generate(pipe, 0, output_type="latent", text_guidance_scale=1.0, product_guidance_scale=1.0)
    product_only = generate(pipe, 0, output_type="latent", text_guidance_scale=1.0, product_guidance_scale=3.0)
    assert guided.shape == (2, 16, 2, 4, 6)
    assert not torch.allclose(guided, conditional) and not torch.allclose(product_only, conditional)


def test_guidance_interval_full_is_todays_output_and_empty_is_the_unguided_path(pipe):
    """Off by default; [0, 1] guides every step (bit for bit today's sampler), an interval no
    step's noise level falls in runs the fully conditioned branch alone (scales 1, one branch)."""
    today = generate(pipe, 0, output_type="latent")
    assert torch.equal(generate(pipe, 0, output_type="latent", guidance_interval=(0.0, 1.0)), today)
    unguided = generate(pipe, 0, output_type="latent", text_guidance_scale=1.0, product_guidance_scale=1.0)
    assert torch.equal(generate(pipe, 0, output_type="latent", guidance_interval=(0.0, 0.0)), unguided)
    partly = generate(pipe, 0, output_type="latent", guidance_interval=(0.7, 1.0))  # sigmas 1, 0.86, 0.6
    assert not torch.allclose(partly, today) and not torch.allclose(partly, unguided)


def test_guidance_interval_runs_one_branch_outside_it(pipe):
    """The saving: steps outside the interval send one branch (not three) through the DiT."""
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        generate(pipe, 0, output_type="latent", guidance_interval=(0.7, 1.0))
    finally:
        handle.remove()
    assert batches == [6, 6, 2]  # batch 2 x 3 branches at sigma 1 and 0.86, the full condition alone at 0.6


def test_joint_condition_drop_branch(pipe):
    """Two branches (full, both dropped); the same guidance as the three separate branches when
    both scales equal the joint one (the no-product branch cancels), other guidance otherwise."""
    from models.pipeline import guidance_branches

    assert guidance_branches(5.0, 3.0, None) == [("prompt", True), ("prompt", False), ("null", False)]
    assert guidance_branches(5.0, 3.0, 4.0) == [("prompt", True), ("null", False)]
    assert guidance_branches(5.0, 3.0, 1.0) == [("prompt", True)]
    separate = generate(pipe, 0, output_type="latent", text_guidance_scale=4.0, product_guidance_scale=4.0)
    joint = generate(pipe, 0, output_type="latent", joint_guidance_scale=4.0)
    torch.testing.assert_close(joint, separate, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(joint, generate(pipe, 0, output_type="latent"))  # today: 5 and 3
    unguided = generate(pipe, 0, output_type="latent", text_guidance_scale=1.0, product_guidance_scale=1.0)
    assert torch.equal(generate(pipe, 0, output_type="latent", joint_guidance_scale=1.0), unguided)


def test_guidance_options_are_off_by_default_and_checked():
    from models.config import SamplerConfig

    assert SamplerConfig().guidance_options() == {}  # the pipeline is called exactly as before
    on = SamplerConfig(guidance_interval=(0.2, 0.8), joint_guidance_scale=4.0)
    assert on.guidance_options() == {"guidance_interval": (0.2, 0.8), "joint_guidance_scale": 4.0}
    with pytest.raises(ValueError, match="0 <= low <= high <= 1"):
        SamplerConfig(guidance_interval=(0.8, 0.2))


def test_guidance_interval_is_refused_with_a_step_cache_and_outside_zero_one(pipe):
    from models import speed

    with pytest.raises(ValueError, match="within"):
        generate(pipe, 0, guidance_interval=(0.5, 1.5))
    speed.enable_step_cache(pipe.transformer, speed.StepCache(speed.FIRST_BLOCK_CACHE, 0.1, 3))
    try:
        with pytest.raises(ValueError, match="use one or the other"):
            generate(pipe, 0, guidance_interval=(0.2, 0.8))
    finally:
        speed.disable_step_cache(pipe.transformer)


def test_each_photo_path_carries_the_photos(pipe):
    masked_video, mask, images = scene()
    other = [[255 - image for image in photos] for photos in images]
    kwargs = dict(num_inference_steps=2, text_guidance_scale=1.0, product_guidance_scale=1.0, output_type="latent")
    base = pipe(masked_video, mask, images, "x", generator=torch.Generator().manual_seed(0), **kwargs)
    for gate in ("attn1", "attn2"):  # close one path at a time: the other still reads the photos
        gates = [getattr(block, gate).processor.gate for block in pipe.transformer.wan.blocks]
        saved = [g.detach().clone() for g in gates]
        with torch.no_grad():
            for g in gates:
                g.zero_()
        try:
            one_path = pipe(masked_video, mask, images, "x", generator=torch.Generator().manual_seed(0), **kwargs)
            swapped = pipe(masked_video, mask, other, "x", generator=torch.Generator().manual_seed(0), **kwargs)
        finally:
            with torch.no_grad():
                for g, value in zip(gates, saved):
                    g.copy_(value)
        assert not torch.allclose(one_path, base) and not torch.allclose(one_path, swapped), gate


def test_grey_fill_and_neutral_canvas():
    video, mask = torch.ones(1, 3, 1, 4, 4), torch.zeros(1, 1, 1, 4, 4)
    mask[..., :2, :] = 1
    grey = fill_masked(video, mask, "grey")
    assert torch.equal(grey[..., :2, :], torch.full_like(grey[..., :2, :], 0.5)) and grey[..., 2:, :].eq(1).all()
    assert fill_masked(video, mask, "black")[..., :2, :].eq(0).all()
    # A tall opaque red photo on a wide canvas: aspect kept, centred, grey beside it.
    photo = np.zeros((40, 20, 4), np.uint8)
    photo[..., 0], photo[..., 3] = 255, 255
    canvas = photo_canvas(photo, 32, 48)
    assert canvas.shape == (3, 32, 48)
    assert torch.allclose(canvas[:, :, 24], torch.tensor([1.0, 0.0, 0.0]).view(3, 1).expand(3, 32), atol=1e-6)
    assert torch.allclose(canvas[:, :, :10], torch.full((3, 32, 10), 0.5))
    photo[..., 3] = 0  # fully transparent: nothing but grey
    assert torch.allclose(photo_canvas(photo, 32, 48), torch.full((3, 32, 48), 0.5))


def test_euler_scheduler_and_progress_callback(pipe):
    from models.pipeline import make_scheduler

    steps = []
    original = pipe.scheduler
    pipe.scheduler = make_scheduler("euler", 3.0)
    try:
        video = generate(pipe, 0, callback=lambda step, total: steps.append((step, total)))
    finally:
        pipe.scheduler = original
    assert steps == [(1, 3), (2, 3), (3, 3)] and torch.isfinite(video).all()


def test_bad_inputs_are_rejected(pipe):
    masked_video, mask, images = scene()
    with pytest.raises(ValueError, match="4k\\+1"):
        pipe(masked_video[:, :, :4], mask[:, :, :4], images, "x", num_inference_steps=1)
    with pytest.raises(ValueError, match="1..5"):
        pipe(masked_video, mask, [images[0], images[1] * 2], "x", num_inference_steps=1)


def test_pipeline_save_and_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = ProductVideoPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is type(pipe.transformer) and loaded.config.text_max_length == 16
    assert torch.equal(generate(loaded, 0), generate(pipe, 0))


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_an_oracle_velocity_samples_exactly_its_target(pipe, monkeypatch, scheduler):
    """The sampler and the training objective agree on time and direction: a transformer that
    returns the true velocity toward fixed latents x0 (x_t = (1 - s) x0 + s e, v = e - x0, with
    s = timestep / 1000, as flow_matching_loss trains it) lands on x0 from any noise."""
    from models.pipeline import make_scheduler

    target = torch.randn(2, 16, 2, 4, 6, generator=torch.Generator().manual_seed(3))

    def oracle(dit_input, timestep, *args, **kwargs):
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        noisy = dit_input[:, :16].float()
        return ((noisy - target.repeat(len(noisy) // 2, 1, 1, 1, 1)) / sigma,)

    monkeypatch.setattr(pipe.transformer, "forward", oracle)
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(scheduler, 3.0))
    latents = generate(pipe, 0, output_type="latent")
    # UniPC hands the transformer whole timesteps (999 for s = 1), as Wan's pipelines do: s is up
    # to 0.5 / 1000 off, which moves the result by a few 1e-3. A wrong time or sign moves it by ~1.
    torch.testing.assert_close(latents, target, atol=1e-2, rtol=0)
