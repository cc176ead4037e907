"""GPU speed: plain diffusers Wan2.1-1.3B against this project's paths, side by side in one run.

Random weights at the real shapes (they change no timing or memory figure): Wan2.1-T2V-1.3B
(30 blocks, 12 x 128 heads, ffn 8960, text_dim 4096), plain with in_channels 36 as in the
baseline (shared/reference/h100_baseline_diffusers.py, whose timing method this keeps), ours with
the poc-1.3b adapter (64 product tokens, product attention 4 x 128 in every block, gates open),
UMT5-XXL, CLIP ViT-H/14 and the Wan VAE. Default clip 49 x 480 x 720 (17,550 tokens), bf16.

Sections (each prints JSON lines; a table comes last and $OUT/bench_gpu.json holds every row):
- check: the two sides compute the same function. Plain diffusers vs ours with the gates closed
  (forward), and each of ours' training paths vs ours on the plain path: loss and gradients of
  two stage-2 steps on the same batch (the weights reset to the plain path's after the first),
  every parameter tensor compared on its own (benchmarks/probe_compiled_gradients.py).
- train: one stage-2 step (fp32 master weights, bf16 autocast, fused AdamW), batch 1 and 2. The
  strongest plain-diffusers recipes: eager with diffusers' full checkpointing; its blocks compiled
  (`compile_repeated_blocks`) with full checkpointing; compiled without checkpointing. Ours, one
  lever added per row: plain path | + cuDNN attention | + selective checkpointing | + compile (the
  default, compiled at batch 1 too). Every compile of something trained carries the
  pytorch#193061 workaround, ours and plain alike (models.speed.training_compile_kwargs). And the
  train flow's own step (tasks.training.train.train_step with poc-1.3b's train settings: gradient
  clipping, LR schedule, the loss sync), samples/s as the train loop logs them.
- data: what a step costs on top when the two videos of a sample are VAE-encoded online (the
  plain diffusers recipe) vs read back precomputed (this project's train flow).
- generation: 50 steps with guidance, VAE decode and composite included. Plain diffusers loop
  (text CFG, 2 branches in one batch) eager and with compiled blocks | ours plain (3 branches,
  eager) | ours exact, the default (cuDNN first, compiled blocks, every step) | + one joint
  condition-drop branch (2 branches) | + a guidance interval (--guidance-interval) | + First Block
  Cache at each --cache-thresholds (none by default: a step cache is calibrated per trained model,
  flows.evaluate --calibrate; random weights say nothing about how often it skips). Generation
  compiles no backward: neither side needs the #193061 workaround there.
- segmentation: benchmarks/gpu_segmentation.py (Grounding DINO base + SAM2.1 hiera-large).

On CUDA (not --tiny) the run also writes its rows under <--docs>/bench/<date>/ and merges what it
measured into <--docs>/performance-results.json (the repo's docs/performance-results.json read
first; what this run did not measure keeps its earlier value, or null). GPU machine, from the
repo root (diffusers and pydantic wheels installed), one section per call to stay in time, into
$OUT (bench/<date>/ is two folders down: it comes back), then copied into docs/ here:
    python3 -m benchmarks.bench_gpu --only check train --batches 2 --docs $OUT
CPU smoke run of every row on tiny components (tests run it; it writes no docs):
    python -m benchmarks.bench_gpu --tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from models import speed, tiny
from models.config import ModelConfig, ObjectiveConfig
from models.objective import flow_matching_loss
from models.pipeline import ProductVideoPipeline, decode_latents, encode_video, make_scheduler
from models.product_encoder import ProductEncoder
from models.spec import set_trainable, specification
from models.transformer import ProductVideoGenerator, ProductWanTransformer, pack_mask

WAN_13B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu",
)
CLIP_VIT_H = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
)
POC_ADAPTER = dict(num_product_tokens=64, product_hidden_dim=1024, product_num_heads=16, product_attention_heads=4)
TINY_ADAPTER = dict(num_product_tokens=8, product_hidden_dim=32, product_num_heads=4, product_attention_heads=1)
# The benchmark's model is the CLIP product path (reference: clip), built from shapes; its
# specification decides what trains (no base folder is read).
CLIP_SPEC = specification(ModelConfig(base_model="unused", image_encoder="unused", reference="clip"))

REPO = Path(__file__).resolve().parents[1]

# (label, checkpointing, attention, compile): the training levers, one added per row.
TRAIN_PATHS = [
    ("ours plain", "full", "default", False),
    ("+ cudnn attention", "full", "cudnn", False),
    ("+ selective checkpointing", "selective", "cudnn", False),
    ("+ compile (default)", "selective", "cudnn", True),
]
OURS_DEFAULT = "+ compile (default)"
TRAIN_FLOW = "train flow step (default)"
# (label, diffusers' full checkpointing, compiled blocks): the plain diffusers training recipes.
PLAIN_TRAIN_PATHS = [
    ("eager, full checkpointing", True, False),
    ("compiled blocks, full checkpointing", True, True),
    ("compiled blocks, no checkpointing", False, True),
]
OURS_EXACT = "ours exact (default): cudnn + compiled blocks"


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


class Bench:
    """Shapes, components and the timing/memory helpers of one run (real or tiny)."""

    def __init__(self, use_tiny: bool, frames: int, height: int, width: int, steps: int):
        self.tiny = use_tiny
        self.device = "cpu" if use_tiny else "cuda"
        self.cuda = self.device == "cuda"
        self.frames, self.height, self.width, self.steps = frames, height, width, steps
        self.latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
        self.tokens = self.latent[0] * (self.latent[1] // 2) * (self.latent[2] // 2)
        self.text_len = 16 if use_tiny else 512
        self.num_images = 5
        self.results = []

    def log(self, name, **fields):
        fields = {"name": name, **fields}
        self.results.append(fields)
        print(json.dumps(fields), flush=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, warm=2, reps=5):
        """Median seconds over reps after warm calls (CUDA events on the GPU)."""
        for _ in range(warm):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def once(self, fn):
        """(result, seconds) of one synchronised call."""
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - start

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def fresh_memory(self):
        torch._dynamo.reset()  # every case compiles its own blocks
        self.reset_peak()

    def gib(self):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def model_tflops(self, seconds: float, passes: int, batch: int = 1) -> float | None:
        """Model FLOPs per second as the baseline counts them (no recompute, no product attention)."""
        if self.tiny:
            return None
        s, d, f, layers, text = self.tokens, 1536, 8960, 30, self.text_len
        per_block = 12 * s * d * d + 4 * s * s * d + 4 * s * d * f + 4 * s * text * d + 4 * text * d * d
        return round(passes * batch * per_block * layers / seconds / 1e12, 1)

    # ---- components (random weights, built on the device) ----
    def wan_config(self):
        config = tiny.tiny_transformer().config if self.tiny else WAN_13B
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    def plain_dit(self):
        torch.manual_seed(0)
        with torch.device(self.device):
            return WanTransformer3DModel(**{**self.wan_config(), "in_channels": 36})

    def generator(self, open_gates=True):
        adapter = TINY_ADAPTER if self.tiny else POC_ADAPTER
        image_dim = 32 if self.tiny else CLIP_VIT_H["hidden_size"]
        torch.manual_seed(0)
        with torch.device(self.device):
            transformer = ProductWanTransformer(
                wan_config=self.wan_config(),
                num_product_tokens=adapter["num_product_tokens"],
                product_attention_heads=adapter["product_attention_heads"],
            )
            encoder = ProductEncoder(
                image_dim=image_dim,
                hidden_dim=adapter["product_hidden_dim"],
                num_tokens=adapter["num_product_tokens"],
                num_heads=adapter["product_num_heads"],
                output_dim=transformer.inner_dim,
            )
        if open_gates:  # the trained state: every product path live
            with torch.no_grad():
                for block in transformer.wan.blocks:
                    block.attn2.processor.gate.fill_(0.1)
        return ProductVideoGenerator(transformer, encoder)

    def pipeline(self, generator: ProductVideoGenerator) -> ProductVideoPipeline:
        with torch.device(self.device):
            text_encoder = tiny.tiny_text_encoder() if self.tiny else UMT5EncoderModel(UMT5Config(**UMT5_XXL))
            image_encoder = tiny.tiny_image_encoder() if self.tiny else CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H))
            vae = tiny.tiny_vae() if self.tiny else AutoencoderKLWan()  # float32, as the pipeline runs it
        size = image_encoder.config.image_size
        return ProductVideoPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder.to(torch.bfloat16).eval(),
            tokenizer=tiny.tiny_tokenizer(),
            image_encoder=image_encoder.to(torch.bfloat16).eval(),
            image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
            product_encoder=generator.product_encoder.to(torch.bfloat16).eval(),
            transformer=generator.transformer.to(torch.bfloat16).eval(),
            scheduler=make_scheduler("unipc", 3.0),
            text_max_length=self.text_len,
            max_product_images=self.num_images,
        )

    # ---- inputs ----
    def latents(self, batch=1, channels=16, dtype=torch.float32, seed=1):
        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(batch, channels, *self.latent, device=self.device, dtype=dtype, generator=generator)

    def pixel_mask(self, batch=1):
        mask = torch.zeros(batch, 1, self.frames, self.height, self.width, device=self.device)
        mask[..., self.height // 4 : 3 * self.height // 4, self.width // 4 : 3 * self.width // 4] = 1
        return mask

    def text(self, batch=1, dtype=torch.float32):
        generator = torch.Generator(self.device).manual_seed(2)
        return torch.randn(
            batch, self.text_len, self.wan_config()["text_dim"], device=self.device, dtype=dtype, generator=generator
        )

    def training_batch(self, batch=1):
        tokens_per_image, dim = (17, 32) if self.tiny else (257, CLIP_VIT_H["hidden_size"])
        generator = torch.Generator(self.device).manual_seed(3)
        tokens = torch.randn(batch, self.num_images, tokens_per_image, dim, device=self.device, generator=generator)
        return {
            "latents": self.latents(batch),
            "masked_latents": self.latents(batch, seed=4),
            "packed_mask": pack_mask(self.pixel_mask(batch), self.latent[1:]),
            "text_embeds": self.text(batch),
            "image_tokens": tokens,
            "photo_mask": torch.ones(batch, self.num_images, dtype=torch.bool, device=self.device),
        }

    def clip_inputs(self):
        """A masked clip and 5 product photos, as generation takes them."""
        generator = torch.Generator(self.device).manual_seed(5)
        mask = self.pixel_mask()
        video = torch.rand(1, 3, self.frames, self.height, self.width, device=self.device, generator=generator)
        photos = [
            (torch.rand(64, 64, 3, generator=generator.manual_seed(6 + i), device=self.device) * 255)
            .to(torch.uint8)
            .cpu()
            .numpy()
            for i in range(self.num_images)
        ]
        return video * (1 - mask), mask, [photos]


def bench_check(b: Bench):
    """Plain diffusers and ours with the gates closed compute the same DiT function."""
    dtype = torch.bfloat16
    x, text, ts = b.latents(channels=36, dtype=dtype), b.text(dtype=dtype), torch.tensor([500.0], device=b.device)
    plain = b.plain_dit().to(dtype).eval()
    ours = b.generator(open_gates=False).transformer.to(dtype).eval()
    missing, unexpected = ours.wan.load_state_dict(plain.state_dict(), strict=False)  # same base weights
    assert not unexpected and all(".attn2.processor." in name for name in missing), (missing, unexpected)
    product = torch.randn(1, ours.config.num_product_tokens, ours.inner_dim, device=b.device, dtype=dtype)
    with torch.no_grad():
        reference = plain(x, ts, text, return_dict=False)[0]
        same = ours(x, ts, text, product, return_dict=False)[0]
    b.log(
        "check",
        what="DiT forward, plain diffusers vs ours (gates closed), bf16",
        relative_error=round(relative_error(same, reference), 5),
    )
    del plain, ours


def _second_step_check(b: Bench, label: str, batch_size: int, gradients: list, reference: dict) -> None:
    """Log each step's loss and per-tensor gradient errors of a path against ours plain."""
    from benchmarks.probe_compiled_gradients import gradient_report  # it imports this module

    for step, (loss, grads) in enumerate(gradients, 1):
        report = gradient_report(grads, reference["gradients"][step - 1][1], worst=3)
        b.log(
            "check",
            what=f"train step {step} on the same batch, {label} vs ours plain, batch {batch_size}",
            path=label,
            batch=batch_size,
            step=step,
            loss_relative_error=round(relative_error(loss, reference["gradients"][step - 1][0]), 6),
            gradient_relative_error=round(report["all_gradients_relative_error"], 5),
            max_param_grad_rel_error=float(f"{report['max_tensor_relative_error']:.4g}"),
            worst=[[name, float(f"{error:.3g}")] for name, error in report["worst"]],
        )


def train_case(
    b: Bench,
    label: str,
    batch_size: int,
    checkpointing: str,
    attention: str,
    compile_blocks: bool,
    reference: dict | None,
) -> dict | None:
    """Time one stage-2 step of ours on a path, after two checked steps: the losses and every
    gradient tensor of both against the plain path's (`reference`), the weights reset to the
    plain path's after the first step. Returns what later paths are checked against when
    `reference` is None."""
    b.fresh_memory()
    model = b.generator().train()
    trainable = set_trainable(model, CLIP_SPEC.trainable_names(model, "full"))
    speed.apply_training_speed(model.transformer, checkpointing, compile_blocks, b.device)
    named = {n: p for n, p in model.named_parameters() if n in trainable}
    parameters = list(named.values())
    batch, objective = b.training_batch(batch_size), ObjectiveConfig()
    autocast = torch.autocast(b.device, dtype=torch.bfloat16, enabled=b.cuda)
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=b.cuda)

    def loss_and_backward(seed=0):
        with speed.attention(attention, b.device):
            with autocast:
                loss = flow_matching_loss(
                    CLIP_SPEC, model, batch, objective, torch.Generator(b.device).manual_seed(seed)
                )
            loss.backward()
        return loss

    gradients = []  # (loss, {name: gradient}) of two steps, on the host: not in the peak
    for step in range(2):
        loss = loss_and_backward(step)
        gradients.append((loss.detach().float().cpu(), {n: p.grad.detach().float().cpu() for n, p in named.items()}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0 and reference is not None:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(reference["weights"][name].to(p.device))
        elif step == 0:
            weights = {name: p.detach().cpu().clone() for name, p in named.items()}
    first = None
    if reference is None:
        first = {"gradients": gradients, "weights": weights}
    else:
        _second_step_check(b, label, batch_size, gradients, reference)
    del gradients
    b.reset_peak()

    def step():
        loss_and_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = b.timed(step, warm=2, reps=3 if b.tiny else 5)
    b.log(
        "train_step",
        model="ours",
        path=label,
        batch=batch_size,
        checkpointing=checkpointing,
        attention=attention,
        compile=compile_blocks and b.cuda,
        s=round(seconds, 3),
        samples_per_s=round(batch_size / seconds, 3),
        model_tflops=b.model_tflops(seconds, 3, batch_size),
        peak_GiB=b.gib(),
    )
    return first  # the model and its optimizer go with this frame


def plain_train_case(b: Bench, batch_size: int, label: str, checkpointing: bool, compiled: bool) -> None:
    """A plain diffusers recipe: time one step, all weights trainable, diffusers' full gradient
    checkpointing or none, its blocks compiled (`compile_repeated_blocks`, with the #193061
    workaround as ours) or eager. Its model and optimizer are freed when it returns."""
    b.fresh_memory()
    plain = b.plain_dit().train()
    if checkpointing:
        plain.enable_gradient_checkpointing()
    if compiled:
        plain.compile_repeated_blocks(**speed.training_compile_kwargs())
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5, fused=b.cuda)
    x, text = b.latents(batch_size, 36), b.text(batch_size)
    ts, target = torch.full((batch_size,), 500.0, device=b.device), b.latents(batch_size, seed=7)

    def step():
        with torch.autocast(b.device, dtype=torch.bfloat16, enabled=b.cuda):
            out = plain(x, ts, text, return_dict=False)[0]
        F.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = b.timed(step, warm=2, reps=3 if b.tiny else 5)
    b.log(
        "train_step",
        model="plain diffusers",
        path=label,
        batch=batch_size,
        checkpointing="full" if checkpointing else "none",
        attention="default",
        compile=compiled,
        mix_order_reduction_off=compiled and bool(speed.training_compile_kwargs()),
        s=round(seconds, 3),
        samples_per_s=round(batch_size / seconds, 3),
        model_tflops=b.model_tflops(seconds, 3, batch_size),
        peak_GiB=b.gib(),
    )


def train_flow_case(b: Bench, batch_size: int) -> None:
    """The train flow's own step on ours at the default path: tasks.training.train.train_step with
    poc-1.3b's train settings (compile, selective checkpointing, cuDNN attention, AdamW, gradient
    clipping, the LR schedule, the loss read back to the host), timed as the train loop times it
    (wall clock around train_step; the batch is already on the device, as precomputed latents
    read in 1.3 ms make it nearly). The objective is the benchmark's (ObjectiveConfig()), its model
    the CLIP product path: the same step as the bare rows, with the loop's extras."""
    from tasks.training.distributed import World
    from tasks.training.run_config import load_run_config
    from tasks.training.train import RankShare, build_optimizer, build_scheduler, train_step

    b.fresh_memory()
    cfg = load_run_config(REPO / "configs/poc-1.3b.yaml", [f"train.stage2.batch_size={batch_size}"])
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"objective": ObjectiveConfig()})})
    device = torch.device(b.device)
    model = b.generator().train()
    trainable = set_trainable(model, CLIP_SPEC.trainable_names(model, "full"))
    speed.apply_training_speed(model.transformer, cfg.train.gradient_checkpointing, cfg.train.compile, device)
    optimizer = build_optimizer(model, trainable, cfg, cfg.train.stage2, device)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, 1000)
    share = RankShare(b.training_batch(batch_size), slice(0, batch_size), batch_size, 1.0)
    world = World(device=device)
    times = []
    for index in range(2 + (3 if b.tiny else 5)):
        started = time.perf_counter()
        train_step(CLIP_SPEC, model, [share], cfg, optimizer, scheduler, None, [index], world, device)
        times.append(time.perf_counter() - started)
    seconds = sorted(times[2:])[len(times[2:]) // 2]
    b.log(
        "train_step",
        model="ours",
        path=TRAIN_FLOW,
        batch=batch_size,
        checkpointing=cfg.train.gradient_checkpointing,
        attention=cfg.train.attention,
        compile=cfg.train.compile and b.cuda,
        s=round(seconds, 3),
        samples_per_s=round(batch_size / seconds, 3),
        peak_GiB=b.gib(),
    )


def bench_train(b: Bench, batches=(1, 2)):
    for batch_size in batches:
        for label, checkpointing, compiled in PLAIN_TRAIN_PATHS:
            try:
                plain_train_case(b, batch_size, label, checkpointing, compiled)
            except Exception as error:  # one case failing must not lose the others
                traceback.print_exc()
                b.log("train_step", model="plain diffusers", path=label, batch=batch_size, error=str(error)[:300])
        reference = None
        for label, checkpointing, attention, compile_blocks in TRAIN_PATHS:
            if batch_size == 2 and label not in ("ours plain", OURS_DEFAULT):
                continue
            try:
                first = train_case(b, label, batch_size, checkpointing, attention, compile_blocks, reference)
                reference = reference or first
            except Exception as error:
                traceback.print_exc()
                b.log("train_step", model="ours", path=label, batch=batch_size, error=str(error)[:300])
        del reference
        try:
            train_flow_case(b, batch_size)
        except Exception as error:
            traceback.print_exc()
            b.log("train_step", model="ours", path=TRAIN_FLOW, batch=batch_size, error=str(error)[:300])


def bench_data(b: Bench):
    """Per sample: VAE-encoding its video and masked video online vs reading them precomputed."""
    b.fresh_memory()
    with torch.device(b.device):
        vae = (tiny.tiny_vae() if b.tiny else AutoencoderKLWan()).eval()
    videos = torch.rand(2, 3, b.frames, b.height, b.width, device=b.device)  # the clip and its masked copy
    with torch.no_grad():
        encode_seconds = b.timed(lambda: encode_video(vae, videos), warm=1, reps=3)
        latents = encode_video(vae, videos)
    tensors = {
        "latents": latents[0].cpu(),
        "masked_latents": latents[1].cpu(),
        "packed_mask": pack_mask(b.pixel_mask(), b.latent[1:])[0].cpu().contiguous(),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.safetensors"
        save_file(tensors, str(path))

        def read():
            return {name: value.to(b.device, non_blocking=False) for name, value in load_file(str(path)).items()}

        read_seconds = b.timed(read, warm=1, reps=5)
        size = path.stat().st_size
    b.log(
        "data_per_sample",
        online_vae_encode_s=round(encode_seconds, 3),
        precomputed_read_s=round(read_seconds, 4),
        latents_file_MiB=round(size / 2**20, 2),
        vae_peak_GiB=b.gib(),
    )


def bench_generation(b: Bench, thresholds: list[float], interval: tuple[float, float], joint_scale: float):
    """50 steps with guidance, decode and composite included: plain diffusers eager and compiled,
    ours on its paths (module doc)."""
    b.fresh_memory()
    dtype = torch.bfloat16
    pipe = b.pipeline(b.generator())
    masked_video, mask, photos = b.clip_inputs()

    # Plain diffusers Wan T2V loop: text CFG, cond + uncond in one batch of 2, bf16 VAE decode.
    plain = b.plain_dit().to(dtype).eval()
    vae_bf16 = pipe.vae.to(dtype)
    plain_seconds = {}
    with torch.no_grad():
        context = torch.cat(
            [b.text(dtype=dtype), torch.zeros(1, b.text_len, b.wan_config()["text_dim"], device=b.device, dtype=dtype)]
        )
        condition = b.latents(channels=20, dtype=dtype)

        def plain_generate(steps):
            scheduler = make_scheduler("unipc", 3.0)
            scheduler.set_timesteps(steps, device=b.device)
            latents = b.latents(seed=8)
            for t in scheduler.timesteps:
                x = torch.cat([latents.to(dtype), condition], dim=1).repeat(2, 1, 1, 1, 1)
                cond, uncond = plain(x, t.expand(2), context, return_dict=False)[0].float().chunk(2)
                latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents, return_dict=False)[0]
            return decode_latents(vae_bf16, latents)

        for label in ("baseline (eager)", "compiled blocks"):
            if label == "compiled blocks":
                plain.compile_repeated_blocks()  # no backward: no #193061 workaround needed (ours alike)
            b.reset_peak()
            plain_generate(2)  # warm-up (compilation)
            _, plain_seconds[label] = b.once(lambda: plain_generate(b.steps))
            b.log(
                "generation",
                model="plain diffusers",
                path=label,
                steps=b.steps,
                branches=2,
                total_s=round(plain_seconds[label], 2),
                peak_GiB=b.gib(),
            )
    pipe.vae.to(torch.float32)
    plain = None  # frees the plain DiT before ours runs (None, not del: plain_generate reads the name)
    baseline = plain_seconds["baseline (eager)"]

    def ours(steps, attention, **options):
        return pipe(
            masked_video,
            mask,
            photos,
            "a red bottle on a table",
            num_inference_steps=steps,
            text_guidance_scale=5.0,
            product_guidance_scale=3.0,
            generator=torch.Generator(b.device).manual_seed(0),
            output_type="pt",
            attention_backend=attention,
            **options,
        )

    def measure(label, attention, exact=None, cached=False, branches=3, **options):
        ours(8, attention, **options)  # warm-up: compilation, and a step cache's skip path
        probe = speed.StepCacheProbe(pipe.transformer) if cached else None
        b.reset_peak()
        call = dict(options, callback=probe) if probe else options
        video, seconds = b.once(lambda: ours(b.steps, attention, **call))
        row = dict(
            model="ours",
            path=label,
            steps=b.steps,
            branches=branches,
            full_steps=probe.full_steps if probe else b.steps,
            total_s=round(seconds, 2),
            speedup_vs_plain=round(baseline / seconds, 2),
            speedup_vs_plain_compiled=round(plain_seconds["compiled blocks"] / seconds, 2),
            peak_GiB=b.gib(),
        )
        if exact is not None:
            row["video_relative_error_vs_exact"] = round(relative_error(video, exact), 5)
        b.log("generation", **row)
        return video

    exact = measure("ours plain", "default")
    speed.apply_generation_speed(pipe.transformer, compile_blocks=True, step_cache_threshold=None, device=b.device)
    fast_exact = measure(OURS_EXACT, "cudnn", exact)
    measure(
        f"+ joint condition-drop branch (scale {joint_scale:g})",
        "cudnn",
        fast_exact,
        branches=2,
        joint_guidance_scale=joint_scale,
    )
    scheduler = make_scheduler("unipc", 3.0)
    scheduler.set_timesteps(b.steps)
    guided = sum(interval[0] <= sigma <= interval[1] for sigma in scheduler.sigmas[:-1].tolist())
    measure(
        f"+ guidance interval [{interval[0]:g}, {interval[1]:g}] ({guided} of {b.steps} steps guided)",
        "cudnn",
        fast_exact,
        guidance_interval=interval,
    )
    for threshold in thresholds:
        speed.enable_step_cache(pipe.transformer, speed.StepCache(speed.FIRST_BLOCK_CACHE, threshold, b.steps))
        measure(f"+ First Block Cache {threshold:g} (uncalibrated)", "cudnn", fast_exact, cached=True)
        speed.disable_step_cache(pipe.transformer)


def performance_results(rows: list[dict], date: str, gpu: str, batch: int = 2) -> dict:
    """The figures docs/performance.md quotes, from a run's rows; None where not measured.
    Train figures at `batch` (poc-1.3b trains stage 2 at 2); the gradient error is the largest of
    any tensor, either step, either batch, of ours' default path against ours plain."""

    def value(name, key, **match):
        found = [
            r[key]
            for r in rows
            if r.get("name") == name and "error" not in r and all(r.get(k) == v for k, v in match.items())
        ]
        return found[-1] if found else None

    errors = [
        r["max_param_grad_rel_error"]
        for r in rows
        if r.get("name") == "check" and r.get("path") == OURS_DEFAULT and "max_param_grad_rel_error" in r
    ]
    plain = {"model": "plain diffusers", "batch": batch}
    ours = {"model": "ours", "batch": batch}
    return {
        "train": {
            "batch": batch,
            "ours_samples_per_s": value("train_step", "samples_per_s", path=OURS_DEFAULT, **ours),
            "ours_train_flow_samples_per_s": value("train_step", "samples_per_s", path=TRAIN_FLOW, **ours),
            "plain_eager_ckpt_samples_per_s": value(
                "train_step", "samples_per_s", path=PLAIN_TRAIN_PATHS[0][0], **plain
            ),
            "plain_compiled_ckpt_samples_per_s": value(
                "train_step", "samples_per_s", path=PLAIN_TRAIN_PATHS[1][0], **plain
            ),
            "plain_compiled_nockpt_samples_per_s": value(
                "train_step", "samples_per_s", path=PLAIN_TRAIN_PATHS[2][0], **plain
            ),
            "ours_peak_gib": value("train_step", "peak_GiB", path=OURS_DEFAULT, **ours),
            "max_param_grad_rel_error": max(errors) if errors else None,
        },
        "generation": {
            "ours_exact_s": value("generation", "total_s", model="ours", path=OURS_EXACT),
            "plain_eager_s": value("generation", "total_s", model="plain diffusers", path="baseline (eager)"),
            "plain_compiled_s": value("generation", "total_s", model="plain diffusers", path="compiled blocks"),
        },
        "date": date,
        "gpu": gpu,
    }


def merge_results(previous: dict | None, new: dict) -> dict:
    """`new` over `previous`, figure by figure: what this run did not measure keeps its earlier
    value (the gradient error: the largest of the same day's runs); `measured` says when each
    figure was measured."""
    merged = json.loads(json.dumps(previous or {}))
    measured = merged.setdefault("measured", {})
    for section in ("train", "generation"):
        target = merged.setdefault(section, {})
        for key, value in new[section].items():
            name = f"{section}.{key}"
            if key == "max_param_grad_rel_error" and value is not None and measured.get(name) == new["date"]:
                value = max(value, target.get(key) or 0.0)  # the day's runs (batch 1, batch 2): the largest
            if value is not None or key not in target:
                target[key] = value
            if value is not None and key != "batch":
                measured[name] = new["date"]
    merged["date"], merged["gpu"] = new["date"], new["gpu"]
    return merged


def write_docs(b: Bench, docs: Path, sections: list[str], table: str, gpu: str) -> Path:
    """The run's rows and table under docs/bench/<date>/, its figures merged into
    docs/performance-results.json; returns the results file."""
    date = datetime.date.today().isoformat()
    folder = docs / "bench" / date
    folder.mkdir(parents=True, exist_ok=True)
    stem = "bench_gpu-" + "-".join(sections)
    (folder / f"{stem}.json").write_text(json.dumps(b.results, indent=1) + "\n")
    (folder / f"{stem}.md").write_text(table)
    previous_file = REPO / "docs" / "performance-results.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else None
    results = merge_results(previous, performance_results(b.results, date, gpu))
    target = docs / "performance-results.json"
    target.write_text(json.dumps(results, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny components")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--cache-thresholds",
        type=float,
        nargs="*",
        default=[],
        help="First Block Cache rows (uncalibrated, random weights); none by default",
    )
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=[0.2, 0.8], metavar=("LOW", "HIGH"))
    parser.add_argument("--joint-scale", type=float, default=5.0, help="the joint condition-drop branch's scale")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="train section's batch sizes")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where bench/<date>/, performance-results.json go")
    parser.add_argument("--no-docs", action="store_true", help="write nothing under --docs")
    sections = ["check", "train", "data", "generation", "segmentation"]
    parser.add_argument("--only", nargs="*", default=sections, choices=sections)
    args = parser.parse_args(argv)
    defaults = (5, 32, 48, 3) if args.tiny else (49, 480, 720, 50)
    frames, height, width, steps = (
        given if given is not None else default
        for given, default in zip((args.frames, args.height, args.width, args.steps), defaults)
    )
    b = Bench(args.tiny, frames, height, width, steps)
    versions = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if b.cuda else "cpu",
        "cudnn": torch.backends.cudnn.version(),
        "mix_order_reduction_off_for_training": speed.needs_mix_order_reduction_workaround(),
    }
    b.log("shape", frames=frames, height=height, width=width, latent=list(b.latent), tokens=b.tokens, **versions)
    runs = {
        "check": lambda: bench_check(b),
        "train": lambda: bench_train(b, args.batches),
        "data": lambda: bench_data(b),
        "generation": lambda: bench_generation(
            b, args.cache_thresholds, tuple(args.guidance_interval), args.joint_scale
        ),
        "segmentation": lambda: bench_segmentation_rows(b),
    }
    for name in args.only:
        try:
            runs[name]()
        except Exception as error:
            traceback.print_exc()
            b.log(name, error=str(error)[:300])
        b.fresh_memory()

    table = "| measurement | figures |\n|---|---|\n" + "".join(
        f"| {row['name']} | {json.dumps({k: v for k, v in row.items() if k != 'name'})} |\n" for row in b.results
    )
    print("\n" + table)
    out = os.environ.get("OUT", "/tmp")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_gpu.json"), "w") as handle:
        json.dump(b.results, handle, indent=1)
    if b.cuda and not b.tiny and not args.no_docs:  # figures come from GPU runs only
        gpu = re.sub(r"\s+", " ", versions["gpu"]).strip()
        target = write_docs(b, Path(args.docs), args.only, table, gpu)
        print(f"wrote {target} and {Path(args.docs) / 'bench'}/")


def bench_segmentation_rows(b: Bench):
    from benchmarks.gpu_segmentation import bench_segmentation

    for row in bench_segmentation(b.device, b.tiny):
        b.log(**row)


if __name__ == "__main__":
    main()
