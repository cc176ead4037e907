"""Does a compiled Wan block still get batch-1 gradients wrong? (models/speed.compiled_block_call)

On the H200 with torch 2.11 (docs/performance.md) the compiled backward of a Wan block gave wrong
scale_shift_table gradients at batch 1, so the training path runs one-clip micro-batches eagerly.
This compiles the blocks directly (bypassing that fallback) on a 4-block model of the 1.3B width
at 17,550 tokens, and prints, per batch size and checkpointing, the gradient error against eager
and the weights it is worst for. When batch 1 agrees as batch 2 does, the fallback can go.

    python3 -m benchmarks.probe_compiled_gradients      # CUDA machine, diffusers installed
"""

import json

import torch

import benchmarks.bench_gpu as bench
from benchmarks.bench_gpu import CLIP_SPEC
from models import speed
from models.config import ObjectiveConfig
from models.objective import flow_matching_loss
from models.spec import set_trainable


def gradients(b: bench.Bench, batch_size: int, checkpoint_function=None) -> dict[str, torch.Tensor]:
    torch._dynamo.reset()
    model = b.generator().train()
    trainable = set_trainable(model, CLIP_SPEC.trainable_names(model, "full"))
    if checkpoint_function is not None:
        model.transformer.wan.enable_gradient_checkpointing(torch.compile(checkpoint_function))
    batch = b.training_batch(batch_size)
    for _ in range(2):  # the second step: compiled code, warm
        model.zero_grad(set_to_none=True)
        with torch.autocast(b.device, dtype=torch.bfloat16, enabled=b.cuda):
            loss = flow_matching_loss(
                CLIP_SPEC, model, batch, ObjectiveConfig(), torch.Generator(b.device).manual_seed(0)
            )
        loss.backward()
    return {name: p.grad.float().cpu() for name, p in model.named_parameters() if name in trainable}


def main():
    bench.WAN_13B = {**bench.WAN_13B, "num_layers": 4}
    b = bench.Bench(use_tiny=not torch.cuda.is_available(), frames=49, height=480, width=720, steps=50)
    for batch_size in (1, 2):
        eager = gradients(b, batch_size)
        for name, function in (
            ("selective", speed.selective_checkpoint),
            ("full", speed.full_checkpoint),
            ("none", speed.no_checkpoint),
        ):
            compiled = gradients(b, batch_size, function)
            worst = sorted(((bench.relative_error(compiled[n], eager[n]), n) for n in eager), reverse=True)[:3]
            total = bench.relative_error(
                torch.cat([g.flatten() for g in compiled.values()]), torch.cat([g.flatten() for g in eager.values()])
            )
            print(
                json.dumps(
                    {
                        "batch": batch_size,
                        "checkpointing": name,
                        "gradient_relative_error": round(total, 5),
                        "worst": [[round(e, 4), n] for e, n in worst],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
