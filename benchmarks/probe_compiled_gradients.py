"""Compiled against eager gradients of Wan blocks, every parameter tensor on its own (pytorch#193061).

Since torch 2.10 Inductor's mix-order reduction can leave part of a gradient unwritten: the
gradients of chunk()-ed slices of one shared parameter (each Wan block's scale_shift_table) come
back holding uninitialised or stale memory (models/speed.py says why and how the training path
avoids it: `triton.mix_order_reduction` off per compile call). On the H200 with torch 2.11 the
scale_shift_tables' gradients were wrong while the whole-model gradient error looked moderate: a
comparison of all gradients at once hides one small wrong tensor among 1.3B weights. So this
compares each parameter tensor separately and reports the worst ones by name.

Per batch size (1 and 2), checkpointing (selective, full, none) and workaround (off, on): the
model (4 blocks of the 1.3B width at 17,550 tokens on CUDA; the tiny model on CPU) takes two
optimizer steps eagerly and two compiled (`models.speed.compiled_block_call`, the training path's
compile), from the same weights, batch and noise. The compiled run's weights are reset to the
eager run's after its first step, so both second backwards see the same weights: the second step
is the one where stale memory from the first would show. For each step: the loss's relative
error, every tensor's relative gradient error ||g_c - g_e|| / ||g_e||, the largest and the worst
tensors named, how many exceed --tolerance, and the all-gradients relative error beside it.

    python3 -m benchmarks.probe_compiled_gradients                       # CUDA, every case
    python3 -m benchmarks.probe_compiled_gradients --batches 1 --checkpointing selective
    python -m benchmarks.probe_compiled_gradients --tiny                 # CPU smoke run (Inductor's C++ backend)

A JSON line per case, a table, and $OUT/probe_compiled_gradients.json. `--corrupt NAME` scales
the compiled gradient of the tensors whose name contains NAME by 1.5 before the comparison: a check of
the probe itself (tests/test_probe_compiled_gradients.py), never of torch. On the CPU the bug
cannot show (mix-order reduction is a Triton kernel), so a tiny run checks the machinery only.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import benchmarks.bench_gpu as bench
from benchmarks.bench_gpu import CLIP_SPEC
from models import speed
from models.config import ObjectiveConfig
from models.objective import flow_matching_loss
from models.spec import set_trainable

CHECKPOINTING = {"selective": speed.selective_checkpoint, "full": speed.full_checkpoint, "none": speed.no_checkpoint}
STEPS = 2
DEFAULT_TOLERANCE = 0.05  # per tensor; bf16 between two eager kernels stays well under it (docs/performance.md)
CORRUPT_FACTOR = 1.5  # --corrupt: off by 0.5 in one tensor, under 0.05 over all of the tiny model's gradients


def _squares(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(||value - reference||^2, ||reference||^2), in float64."""
    reference = reference.double()
    return float((value.double() - reference).square().sum()), float(reference.square().sum())


def _ratio(error: float, scale: float) -> float:
    if scale == 0:
        return 0.0 if error == 0 else float("inf")
    return (error / scale) ** 0.5


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return _ratio(*_squares(value, reference))


def gradient_report(candidate: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], worst: int = 5) -> dict:
    """Every tensor's relative error, the largest, the `worst` tensors by name, and the error of
    all gradients taken as one vector (what hides a small wrong tensor; summed tensor by tensor,
    never concatenated: 1.3B weights in float64 would be 11 GB)."""
    if candidate.keys() != reference.keys():
        raise ValueError(f"different parameters: {sorted(candidate.keys() ^ reference.keys())[:5]}")
    errors, total_error, total_scale = {}, 0.0, 0.0
    for name in reference:
        error, scale = _squares(candidate[name], reference[name])
        errors[name] = _ratio(error, scale)
        total_error, total_scale = total_error + error, total_scale + scale
    ranked = sorted(errors.items(), key=lambda item: item[1], reverse=True)
    return {
        "tensors": len(errors),
        "max_tensor_relative_error": ranked[0][1] if ranked else 0.0,
        "worst": [[name, error] for name, error in ranked[:worst]],
        "all_gradients_relative_error": _ratio(total_error, total_scale),
        "errors": errors,
    }


def _gradients(model, trainable: set[str]) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters() if name in trainable}


def two_steps(
    b: bench.Bench,
    batch_size: int,
    checkpointing: str | None = None,
    workaround: bool | None = None,
    weights_after_first: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Two optimizer steps of a fresh model on one batch: eager (checkpointing None) or the
    training path's compiled block call with `checkpointing` and the workaround on or off. With
    `weights_after_first` the weights are set to them after the first step (the eager run's), so
    the second backward sees the same weights as eager's. Returns losses, both steps' gradients
    and the weights after the first step."""
    torch._dynamo.reset()
    model = b.generator().train()
    trainable = set_trainable(model, CLIP_SPEC.trainable_names(model, "full"))
    if checkpointing is not None:
        model.transformer.wan.enable_gradient_checkpointing(
            speed.compiled_block_call(CHECKPOINTING[checkpointing], workaround)
        )
    parameters = {name: p for name, p in model.named_parameters() if name in trainable}
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-5)
    batch = b.training_batch(batch_size)
    result = {"losses": [], "gradients": []}
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(b.device, dtype=torch.bfloat16, enabled=b.cuda):
            loss = flow_matching_loss(
                CLIP_SPEC, model, batch, ObjectiveConfig(), torch.Generator(b.device).manual_seed(step)
            )
        loss.backward()
        result["losses"].append(loss.detach().float().cpu())
        result["gradients"].append(_gradients(model, trainable))
        optimizer.step()
        if step == 0:
            if weights_after_first is not None:
                with torch.no_grad():
                    for name, p in parameters.items():
                        p.copy_(weights_after_first[name].to(p.device))
            result["weights_after_first"] = {name: p.detach().cpu().clone() for name, p in parameters.items()}
    del model, optimizer
    return result


def compare(compiled: dict, eager: dict, tolerance: float, corrupt: str | None = None) -> dict:
    """The per-step reports of a compiled run against the eager one (`corrupt`: see the module doc)."""
    steps = []
    for step in range(STEPS):
        gradients = compiled["gradients"][step]
        if corrupt:
            gradients = {n: g * CORRUPT_FACTOR if corrupt in n else g for n, g in gradients.items()}
        report = gradient_report(gradients, eager["gradients"][step])
        report["loss_relative_error"] = relative_error(compiled["losses"][step], eager["losses"][step])
        report["tensors_over_tolerance"] = sum(error > tolerance for error in report.pop("errors").values())
        steps.append(report)
    return {"steps": steps, "agrees": all(s["tensors_over_tolerance"] == 0 for s in steps)}


def run_probe(
    b: bench.Bench,
    batches=(1, 2),
    checkpointings=("selective", "full", "none"),
    workarounds=(False, True),
    tolerance: float = DEFAULT_TOLERANCE,
    corrupt: str | None = None,
    log=print,
) -> dict:
    """Every case (module doc); returns {"cases", "summary"}."""
    cases = []
    for batch_size in batches:
        eager = two_steps(b, batch_size)
        for checkpointing in checkpointings:
            for workaround in workarounds:
                compiled = two_steps(b, batch_size, checkpointing, workaround, eager["weights_after_first"])
                case = {
                    "batch": batch_size,
                    "checkpointing": checkpointing,
                    "mix_order_reduction_off": workaround,
                    **compare(compiled, eager, tolerance, corrupt),
                }
                cases.append(case)
                log(json.dumps(_rounded(case)))
                del compiled
        del eager
    summary = {"torch": torch.__version__, "device": b.device, "tolerance": tolerance}
    for workaround in workarounds:
        mine = [c for c in cases if c["mix_order_reduction_off"] == workaround]
        key = "with_workaround" if workaround else "without_workaround"
        summary[f"max_param_grad_rel_error_{key}"] = max(
            (s["max_tensor_relative_error"] for c in mine for s in c["steps"]), default=None
        )
        summary[f"all_agree_{key}"] = all(c["agrees"] for c in mine)
    summary["workaround_needed_by_this_torch"] = speed.needs_mix_order_reduction_workaround()
    return {"cases": cases, "summary": summary}


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def print_table(result: dict) -> None:
    print(
        "\n| batch | checkpointing | mix-order reduction | step | max tensor error | worst tensor | "
        "tensors over tol. | all gradients | loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in result["cases"]:
        for step, report in enumerate(case["steps"], 1):
            name, error = report["worst"][0]
            print(
                f"| {case['batch']} | {case['checkpointing']} | "
                f"{'off (workaround)' if case['mix_order_reduction_off'] else 'on (default)'} | {step} | "
                f"{error:.3g} | {name} | {report['tensors_over_tolerance']} / {report['tensors']} | "
                f"{report['all_gradients_relative_error']:.3g} | {report['loss_relative_error']:.3g} |"
            )
    print("\n" + json.dumps(_rounded(result["summary"])))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--checkpointing", nargs="+", default=list(CHECKPOINTING), choices=list(CHECKPOINTING))
    parser.add_argument(
        "--workaround", nargs="+", default=["off", "on"], choices=["off", "on"], help="mix-order reduction off: on"
    )
    parser.add_argument("--blocks", type=int, default=4, help="Wan blocks of the 1.3B width (CUDA)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="per-tensor relative error")
    parser.add_argument("--corrupt", default=None, help="self-check: scale these compiled gradients (module doc)")
    args = parser.parse_args(argv)
    use_tiny = args.tiny or not torch.cuda.is_available()
    if use_tiny:
        b = bench.Bench(use_tiny=True, frames=5, height=32, width=48, steps=3)
    else:
        bench.WAN_13B = {**bench.WAN_13B, "num_layers": args.blocks}
        b = bench.Bench(use_tiny=False, frames=49, height=480, width=720, steps=50)
    result = run_probe(
        b,
        args.batches,
        args.checkpointing,
        [w == "on" for w in args.workaround],
        args.tolerance,
        args.corrupt,
    )
    print_table(result)
    out = os.environ.get("OUT", "/tmp")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "probe_compiled_gradients.json"), "w") as handle:
        json.dump(_rounded(result), handle, indent=1)
    return result


if __name__ == "__main__":
    main()
