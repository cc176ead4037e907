"""Plain diffusers Wan2.1-1.3B vs this project's ProductVideoGenerator, side by side in one run.

Random weights at the real shapes (they change no timing or memory figure): Wan2.1-T2V-1.3B
(30 blocks, 12 x 128 heads, ffn 8960, text_dim 4096), plain with in_channels 36 as in the
baseline (shared/reference/h100_baseline_diffusers.py, whose timing method this copies), ours
with the poc-1.3b adapter (64 product tokens, product attention 4 x 128 in every block),
UMT5-XXL text encoder, CLIP ViT-H/14 image encoder, Wan VAE. Default clip 49 x 480 x 720
(13 x 60 x 90 latents, 17,550 tokens), bf16.

Measures: DiT forward; a training step (fp32 master weights, bf16 autocast, fused AdamW,
gradient checkpointing) for plain, stage 1 and stage 2; a 50-step generation with guidance
(plain: text CFG, 2 branches; ours: text + product guidance, 3 branches, batched), DiT only and
end to end (text/image encoders, VAE encode of the masked video, decode, composite), with peak
memory. Prints one JSON line per measurement, a table last, and writes $OUT/bench_model.json.

GPU box, from the repo root (needs the diffusers and pydantic wheels installed):
    OUT=/tmp/out python3 -m benchmarks.bench_model_gpu
CPU smoke run of the same code on tiny components (seconds):
    python -m benchmarks.bench_model_gpu --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from models import tiny
from models.config import ObjectiveConfig
from models.objective import flow_matching_loss
from models.pipeline import combine_guidance, composite, decode_latents, encode_video, make_scheduler
from models.product_encoder import ProductEncoder
from models.training_stages import set_training_stage
from models.transformer import ProductVideoGenerator, ProductWanTransformer, build_dit_input, pack_mask

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu")
POC_ADAPTER = dict(num_product_tokens=64, product_hidden_dim=1024, product_num_heads=16, product_attention_heads=4)


class Bench:
    """Shapes, components and the timing/memory helpers of one run (real or tiny)."""

    def __init__(self, use_tiny: bool, frames: int, height: int, width: int, steps: int):
        self.tiny = use_tiny
        self.device = "cpu" if use_tiny else "cuda"
        self.cuda = self.device == "cuda"
        self.frames, self.height, self.width, self.steps = frames, height, width, steps
        self.latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
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
                start.record(); fn(); end.record(); torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
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

    def gib(self, peak=True):
        if not self.cuda:
            return None
        value = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
        return round(value / 2**30, 2)

    # ---- components (random weights, built on the device) ----
    def wan_config(self):
        return tiny.tiny_transformer().config if self.tiny else WAN_13B

    def plain_dit(self):
        config = {k: v for k, v in dict(self.wan_config()).items() if not k.startswith("_")}
        with torch.device(self.device):
            return WanTransformer3DModel(**{**config, "in_channels": 36})

    def generator(self):
        config = {k: v for k, v in dict(self.wan_config()).items() if not k.startswith("_")}
        adapter = dict(num_product_tokens=8, product_hidden_dim=32, product_num_heads=4,
                       product_attention_heads=1) if self.tiny else POC_ADAPTER
        image_dim = 32 if self.tiny else CLIP_VIT_H["hidden_size"]
        with torch.device(self.device):
            transformer = ProductWanTransformer(wan_config=config, num_product_tokens=adapter["num_product_tokens"],
                                                product_attention_heads=adapter["product_attention_heads"])
            encoder = ProductEncoder(image_dim=image_dim, hidden_dim=adapter["product_hidden_dim"],
                                     num_tokens=adapter["num_product_tokens"], num_heads=adapter["product_num_heads"],
                                     output_dim=transformer.inner_dim)
        with torch.no_grad():  # open the gates: trained state, every product path live
            for block in transformer.wan.blocks:
                block.attn2.processor.gate.fill_(0.1)
        return ProductVideoGenerator(transformer, encoder)

    def text_encoder(self):
        with torch.device(self.device):
            model = tiny.tiny_text_encoder() if self.tiny else UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        return model.to(torch.bfloat16).eval()

    def image_encoder(self):
        with torch.device(self.device):
            model = tiny.tiny_image_encoder() if self.tiny else CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H))
        return model.to(torch.bfloat16).eval()

    def vae(self):
        with torch.device(self.device):  # float32, as the pipeline (and diffusers' Wan examples) run it
            return (tiny.tiny_vae() if self.tiny else AutoencoderKLWan()).eval()

    # ---- inputs ----
    def latents(self, channels=16, dtype=torch.float32):
        return torch.randn(1, channels, *self.latent, device=self.device, dtype=dtype)

    def pixel_mask(self):
        mask = torch.zeros(1, 1, self.frames, self.height, self.width, device=self.device)
        mask[..., self.height // 4:3 * self.height // 4, self.width // 4:3 * self.width // 4] = 1
        return mask

    def image_tokens(self, dtype=torch.float32):
        tokens_per_image, dim = (17, 32) if self.tiny else (257, CLIP_VIT_H["hidden_size"])
        tokens = torch.randn(1, self.num_images, tokens_per_image, dim, device=self.device, dtype=dtype)
        return tokens, torch.ones(1, self.num_images, dtype=torch.bool, device=self.device)

    def text(self, dtype=torch.float32):
        text_dim = self.wan_config()["text_dim"]
        return torch.randn(1, self.text_len, text_dim, device=self.device, dtype=dtype)

    def training_batch(self):
        tokens, mask = self.image_tokens()
        return {"latents": self.latents(), "masked_latents": self.latents(),
                "packed_mask": pack_mask(self.pixel_mask(), self.latent[1:]), "text_embeds": self.text(),
                "image_tokens": tokens, "image_mask": mask}


def bench_forward(b: Bench):
    dtype = torch.bfloat16
    x, text, ts = b.latents(36, dtype), b.text(dtype), torch.tensor([500.0], device=b.device)
    b.reset_peak()
    plain = b.plain_dit().to(dtype).eval()
    with torch.no_grad():
        seconds = b.timed(lambda: plain(x, ts, text, return_dict=False))
    b.log("dit_forward", model="plain", params_M=round(sum(p.numel() for p in plain.parameters()) / 1e6),
          s=round(seconds, 3), peak_GiB=b.gib())
    del plain
    b.reset_peak()
    generator = b.generator().to(dtype).eval()
    tokens, mask = b.image_tokens(dtype=dtype)
    with torch.no_grad():
        product = generator.product_encoder(tokens, mask)
        seconds = b.timed(lambda: generator.transformer(x, ts, text, product, return_dict=False))
        encoder_seconds = b.timed(lambda: generator.product_encoder(tokens, mask))
    b.log("dit_forward", model="ours", params_M=round(sum(p.numel() for p in generator.transformer.parameters()) / 1e6),
          s=round(seconds, 3), product_encoder_s=round(encoder_seconds, 4), peak_GiB=b.gib())
    del generator


def bench_train(b: Bench):
    autocast = torch.autocast(b.device, dtype=torch.bfloat16)
    cases = [("plain", None), ("ours", 1), ("ours", 2)]
    for model_name, stage in cases:
        try:
            b.reset_peak()
            if stage is None:
                model = b.plain_dit().train()
                model.enable_gradient_checkpointing()
                parameters = list(model.parameters())
                x, text = b.latents(36), b.text()
                ts, target = torch.tensor([500.0], device=b.device), b.latents()

                def loss_fn():
                    return F.mse_loss(model(x, ts, text, return_dict=False)[0].float(), target)
            else:
                model = b.generator().train()
                trainable = set_training_stage(model, stage)
                model.transformer.enable_gradient_checkpointing()
                parameters = [p for n, p in model.named_parameters() if n in trainable]
                batch, objective = b.training_batch(), ObjectiveConfig()
                rng = torch.Generator(b.device).manual_seed(0)

                def loss_fn():
                    return flow_matching_loss(model, batch, objective, rng)
            optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=b.cuda)

            def step():
                with autocast:
                    loss = loss_fn()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds = b.timed(step, warm=2, reps=3 if b.tiny else 5)
            b.log("train_step", model=model_name, stage=stage, grad_ckpt=True,
                  trainable_params_M=round(sum(p.numel() for p in parameters) / 1e6, 2),
                  s=round(seconds, 3), peak_GiB=b.gib())
            del model, optimizer, parameters
        except Exception as error:  # an OOM in one case must not lose the others
            traceback.print_exc()
            b.log("train_step", model=model_name, stage=stage, error=str(error)[:300])
        finally:
            if b.cuda:
                torch.cuda.empty_cache()


def denoise(b: Bench, scheduler, steps, velocity_fn):
    latents = b.latents()
    scheduler.set_timesteps(steps, device=b.device)
    for t in scheduler.timesteps:
        latents = scheduler.step(velocity_fn(latents, t), t, latents, return_dict=False)[0]
    return latents


def bench_generation(b: Bench):
    """50 steps with guidance, then end to end. Encoders and VAE stay resident for both models."""
    dtype = torch.bfloat16
    text_encoder, vae = b.text_encoder(), b.vae()
    ids = torch.randint(0, text_encoder.config.vocab_size, (1, b.text_len), device=b.device)
    attention = torch.zeros_like(ids)
    attention[:, :min(60, b.text_len)] = 1  # a typical prompt's length; the rest is padding
    pixel_mask = b.pixel_mask()
    masked_video = torch.rand(1, 3, b.frames, b.height, b.width, device=b.device) * (1 - pixel_mask)

    def encode_prompt():
        hidden = text_encoder(ids, attention).last_hidden_state
        return (hidden * attention.unsqueeze(-1)).to(dtype)

    def finish(latents, composite_too):
        video = decode_latents(vae, latents)
        return composite(video, masked_video, pixel_mask) if composite_too else video

    with torch.no_grad():
        # Plain Wan T2V: text CFG, cond + uncond in one batch of 2.
        plain = b.plain_dit().to(dtype).eval()
        condition = b.latents(20)
        b.reset_peak()
        resident = b.gib(peak=False)
        text, _ = b.once(encode_prompt)
        context = torch.cat([text, torch.zeros_like(text)])

        def plain_velocity(latents, t):
            x = torch.cat([latents, condition], dim=1).to(dtype).repeat(2, 1, 1, 1, 1)
            cond, uncond = plain(x, t.expand(2), context, return_dict=False)[0].float().chunk(2)
            return uncond + 5.0 * (cond - uncond)

        denoise(b, make_scheduler("unipc", 3.0), 2, plain_velocity)  # warm-up
        latents, dit_seconds = b.once(lambda: denoise(b, make_scheduler("unipc", 3.0), b.steps, plain_velocity))
        _, decode_seconds = b.once(lambda: finish(latents, composite_too=False))
        b.log("generation", model="plain", steps=b.steps, branches=2, dit_s=round(dit_seconds, 2),
              decode_s=round(decode_seconds, 2), resident_GiB=resident, peak_GiB=b.gib())
        del plain

        # Ours: text encoder, CLIP over 5 photos, product encoder, VAE encode of the masked video,
        # 3 guidance branches (full, no product, neither) in one batch of 3, decode, composite.
        generator = b.generator().to(dtype).eval()
        image_encoder = b.image_encoder()
        size = image_encoder.config.image_size
        pixels = torch.randn(b.num_images, 3, size, size, device=b.device, dtype=dtype)
        b.reset_peak()
        resident = b.gib(peak=False)
        phases = {}

        def run(steps):
            text, phases["text_s"] = b.once(encode_prompt)
            tokens, phases["image_encoder_s"] = b.once(
                lambda: image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2])
            mask = torch.ones(1, b.num_images, dtype=torch.bool, device=b.device)
            product, phases["product_encoder_s"] = b.once(
                lambda: generator.product_encoder(tokens.unsqueeze(0), mask))
            masked_latents, phases["vae_encode_s"] = b.once(lambda: encode_video(vae, masked_video))
            packed = pack_mask(pixel_mask, masked_latents.shape[-2:])
            context = torch.cat([text, text, torch.zeros_like(text)])
            products = torch.cat([product, torch.zeros_like(product), torch.zeros_like(product)])

            def velocity(latents, t):
                x = build_dit_input(latents, masked_latents, packed).to(dtype).repeat(3, 1, 1, 1, 1)
                full, no_product, uncond = generator.transformer(x, t.expand(3), context, products,
                                                                 return_dict=False)[0].float().chunk(3)
                return combine_guidance(full, no_product, uncond, 5.0, 3.0)

            latents, phases["dit_s"] = b.once(lambda: denoise(b, make_scheduler("unipc", 3.0), steps, velocity))
            _, phases["decode_composite_s"] = b.once(lambda: finish(latents, composite_too=True))

        run(2)  # warm-up
        b.reset_peak()
        _, total = b.once(lambda: run(b.steps))
        b.log("generation", model="ours", steps=b.steps, branches=3, **{k: round(v, 3) for k, v in phases.items()},
              total_s=round(total, 2), resident_GiB=resident, peak_GiB=b.gib())
        weights = {"text_encoder": text_encoder, "image_encoder": image_encoder, "vae_fp32": vae,
                   "dit_and_adapter": generator}
        b.log("weights_GiB", **{name: round(sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30, 2)
                                for name, m in weights.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny components")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["forward", "train", "generation"])
    args = parser.parse_args()
    defaults = (5, 32, 48, 3) if args.tiny else (49, 480, 720, 50)
    frames, height, width, steps = (given if given is not None else default for given, default in
                                    zip((args.frames, args.height, args.width, args.steps), defaults))
    b = Bench(args.tiny, frames, height, width, steps)
    print("torch", torch.__version__, torch.cuda.get_device_name(0) if b.cuda else "cpu", flush=True)
    b.log("shape", frames=frames, height=height, width=width, latent=list(b.latent),
          tokens=b.latent[0] * (b.latent[1] // 2) * (b.latent[2] // 2))
    for name, fn in (("forward", bench_forward), ("train", bench_train), ("generation", bench_generation)):
        if name in args.skip:
            continue
        try:
            fn(b)
        except Exception as error:
            traceback.print_exc()
            b.log(name, error=str(error)[:300])
        if b.cuda:
            torch.cuda.empty_cache()

    print("\n| measurement | figures |\n|---|---|")
    for row in b.results:
        print("|", row["name"], "|", json.dumps({k: v for k, v in row.items() if k != "name"}), "|")
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, "bench_model.json"), "w") as handle:
        json.dump(b.results, handle, indent=1)


if __name__ == "__main__":
    main()
