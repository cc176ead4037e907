"""The fast paths (models/speed.py): same function as the plain path, switches that work.

The CPU has no cuDNN attention and compiles nothing, so what runs here is the checkpointing
policy, the attention context, the step cache and the config switches; benchmarks/bench_gpu.py
measures the speed (and checks the same equalities) on the GPU.
"""

import pytest
import torch

from models import speed
from models.config import SamplerConfig
from models.objective import flow_matching_loss
from models.spec import set_trainable, specification
from tasks.training.run_config import load_run_config
from tests.test_model_training import make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stage2_gradients(model, batch, tiny_cfg):
    model.zero_grad(set_to_none=True)
    loss = flow_matching_loss(
        specification(tiny_cfg), model, batch, tiny_cfg.objective, torch.Generator().manual_seed(0)
    )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["selective", "full"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(tiny_cfg, checkpointing):
    tiny_batch = make_batch()
    torch.manual_seed(0)
    spec = specification(tiny_cfg)
    model = spec.build_generator().train()
    for block in model.transformer.wan.blocks:  # open the gates: the reference path has gradients too
        torch.nn.init.normal_(block.attn1.processor.gate, std=0.1)
    set_trainable(model, spec.trainable_names(model, "full"))
    loss, reference = stage2_gradients(model, tiny_batch, tiny_cfg)
    speed.apply_training_speed(model.transformer, checkpointing, compile_blocks=True, device="cpu")
    assert model.transformer.wan.gradient_checkpointing
    checkpointed_loss, gradients = stage2_gradients(model, tiny_batch, tiny_cfg)
    assert torch.equal(checkpointed_loss, loss)
    assert gradients.keys() == reference.keys() and len(gradients) > 50
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_selective_policy_keeps_attention_and_recomputes_the_rest():
    keep = speed._keep_attention_outputs
    assert (
        keep(None, torch.ops.aten._scaled_dot_product_cudnn_attention.default)
        == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    )
    assert keep(None, torch.ops.aten.mm.default) == torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="attention backend"):
        speed.attention("flash3", "cpu")
    with pytest.raises(ValueError, match="checkpointing"):
        speed.apply_training_speed(None, "some", False, "cpu")


def test_step_cache_skips_steps_and_resets_between_calls(tiny_cfg):
    """With a threshold no step passes, the cache changes nothing; with a huge one, every step
    after the first of a call reuses it, and the next call starts fresh."""
    torch.manual_seed(0)
    spec = specification(tiny_cfg)
    pipe = spec.pipeline(spec.build_generator())
    for block in pipe.transformer.wan.blocks:
        block.attn1.processor.gate.data.fill_(0.1)
    video = torch.rand(1, 3, 5, 32, 48)
    mask = torch.zeros(1, 1, 5, 32, 48)
    mask[..., 8:24, 12:36] = 1
    photos = [[(torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()]]

    def generate():
        full_steps = []
        handle = pipe.transformer.wan.blocks[-1].ffn.register_forward_hook(lambda *_: full_steps.append(1))
        out = pipe(
            video * (1 - mask),
            mask,
            photos,
            "a red bottle",
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
        handle.remove()
        return out, len(full_steps)

    exact, steps = generate()
    assert steps == 4
    speed.apply_generation_speed(pipe.transformer, compile_blocks=True, step_cache_threshold=1e-9, device="cpu")
    same, steps = generate()
    assert steps == 4 and torch.allclose(same, exact, atol=1e-6)
    pipe.transformer.wan.disable_cache()
    speed.apply_generation_speed(pipe.transformer, compile_blocks=False, step_cache_threshold=1e9, device="cpu")
    cached, steps = generate()
    assert steps == 1 and not torch.allclose(cached, exact)
    again, steps = generate()
    assert steps == 1 and torch.equal(again, cached)  # fresh state: the same call gives the same video


def test_plain_switches(tmp_path):
    cfg = load_run_config("configs/poc-1.3b.yaml")
    assert (cfg.train.gradient_checkpointing, cfg.train.attention, cfg.train.compile) == ("selective", "cudnn", True)
    plain = load_run_config(
        "configs/poc-1.3b.yaml", ["train.gradient_checkpointing=full", "train.attention=default", "train.compile=false"]
    )
    assert plain.fingerprint() == cfg.fingerprint()  # the same run, resumable on either path
    cheaper = load_run_config(
        "configs/poc-1.3b.yaml",
        [
            "model.sampler.compile=false",
            "model.sampler.guidance_interval=[0.2,0.8]",
            "model.sampler.joint_guidance_scale=4",
            "evaluate.calibration.enabled=true",
        ],
    )
    assert cheaper.fingerprint() == cfg.fingerprint()  # added after runs were named: a run keeps its name
    assert load_run_config("configs/poc-1.3b.yaml", ["train.stage2.batch_size=4"]).fingerprint() != cfg.fingerprint()
    old = load_run_config("configs/tiny.yaml", ["train.gradient_checkpointing=true"])
    assert old.train.gradient_checkpointing == "full"  # configs written before the choice: diffusers' default
    sampler = SamplerConfig().plain()
    assert (sampler.attention, sampler.compile) == ("default", False)


def test_opened_models_compute_every_step_by_default_and_on_the_plain_path(logged_model):
    """Exact by default (issue 16): a model without a calibrated step cache skips no step; this
    fails if a step cache became a default again."""
    from flows.generate import open_model

    for plain in (False, True):
        pipe, run_config = open_model(logged_model, "cpu", plain=plain)
        assert not pipe.transformer.wan.is_cache_enabled
        with pytest.raises(ValueError, match="no step cache"):
            speed.StepCacheProbe(pipe.transformer)
    assert "step_cache_threshold" not in SamplerConfig().model_dump()


def test_step_cache_quality_measure_runs_on_a_logged_model(logged_model, tmp_path):
    from experiments.poc.step_cache import measure_step_cache

    result = measure_step_cache(logged_model, [1e9], tmp_path, steps=3, max_clips=1, device="cpu")
    exact, fast, cached = result["rows"]
    assert exact["full_step_fraction"] == fast["full_step_fraction"] == 1.0
    assert cached["full_step_fraction"] == round(1 / 3, 3)
    assert fast["psnr_mask_vs_exact"] > 60  # CPU: cuDNN and compile change nothing
    assert cached["psnr_mask_vs_exact"] < fast["psnr_mask_vs_exact"]
    assert (tmp_path / "step_cache.json").is_file()


@pytest.mark.parametrize("clips", [1, 2])
def test_compiled_training_call_gives_the_eager_gradients(tiny_cfg, clips):
    """The compiled path (CUDA by default) compiled here on the CPU, at one clip too: with the
    #193061 workaround one-clip micro-batches no longer fall back to eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    spec = specification(tiny_cfg)
    model = spec.build_generator().train()
    set_trainable(model, spec.trainable_names(model, "full"))
    batch = make_batch(batch=clips)
    loss, reference = stage2_gradients(model, batch, tiny_cfg)
    model.transformer.wan.enable_gradient_checkpointing(speed.compiled_block_call(speed.selective_checkpoint))
    compiled_loss, gradients = stage2_gradients(model, batch, tiny_cfg)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_step_cache_command_names_a_missing_model(tmp_path, capsys):
    from experiments.poc.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["step-cache", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no-such-model is neither a model URI nor an existing checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
