"""The PoC experiment of docs/poc.md (issue 14): do product photos put the product into the video,
for products never seen in training?

    python -m experiments.poc render --products 1000 --workers 16   # colourway studio -> dataset
    python -m experiments.poc brackets [--vae data/poc/base]         # gate 1: mask-region brackets
    python -m experiments.poc gpu --deadline-s 540                   # GPU: every step below, resumable
    python -m experiments.poc report --mlflow-db out/mlflow.db --out docs/bench/...   # loss curves
    python -m experiments.poc step-cache                             # GPU: fast generation's cost on A

`gpu` does the next steps not yet done and stops before the deadline (the GPU machine allows 10
minutes a command; run it again on the same machine and it goes on: training runs resume from
their last checkpoint). Steps that train or evaluate go through the project's own flows
(`python -m flows.train`, `python -m flows.evaluate`) in a subprocess:

1. render: the colourway studio straight into data/poc/dataset (true masks; experiments/poc/render.py);
2. base: data/poc/base, the VAE trained on the windows the DiT reads and on the photos (gate 2:
   >= 22 dB inside the mask of the test windows; experiments/poc/base.py);
3. brackets: gate 1 with the VAE's ceiling (experiments/poc/brackets.py);
4. overfit: gate 3, the model trained on OVERFIT_CLIPS train clips alone must reach 20 dB inside
   the mask on them (experiments/poc/overfit.py); the experiment stops here if it does not;
5. train A (photos as reference latents) and B (the same run with every sample's photos withheld);
6. evaluate A and B through the evaluate flow (test split + train clips; the decision matrix);
7. measure: A, B, A without photos and A with another product's photos on the test products
   (experiments/poc/measure.py); results.json, the MLflow database, the measures and the contact
   sheet under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.poc import CONFIG, DATA, RUNS

TRAIN_CLIPS_EVALUATED = 16
OVERFIT_GATE_DB = 20.0


def run_step(name: str, command: list[str], deadline: float) -> bool:
    """Run a step as a subprocess until the deadline; True when it finished."""
    left = deadline - time.monotonic()
    if left < 20:
        print(f"[poc] no time left for {name}", flush=True)
        return False
    print(f"[poc] {name}: {' '.join(command)} ({left:.0f} s left)", flush=True)
    started = time.monotonic()
    try:
        subprocess.run(command, check=True, timeout=left)
    except subprocess.TimeoutExpired:
        print(
            f"[poc] {name}: stopped at the deadline after {time.monotonic() - started:.0f} s; run again to go on",
            flush=True,
        )
        return False
    print(f"[poc] {name}: done in {time.monotonic() - started:.0f} s", flush=True)
    return True


def gpu(args) -> None:
    """The pending steps until the deadline, then what exists so far under --out (also when the
    deadline cut the run short: the GPU machine's disk goes when it is given back)."""
    state_file = DATA / "state.json"
    DATA.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        run_pending(state, state_file, args, time.monotonic() + args.deadline_s)
    finally:
        collect(state, Path(args.out))


def run_pending(state: dict, state_file: Path, args, deadline: float) -> None:
    py = sys.executable

    def record(key: str, value: dict) -> None:
        state[key] = value
        state_file.write_text(json.dumps(state, indent=2) + "\n")

    def step(key: str, command: list[str], result: Path) -> bool:
        if key in state:
            return True
        if not run_step(key, command, deadline):
            return False
        record(key, json.loads(result.read_text()))
        return True

    if "render" not in state:
        from experiments.poc.render import render_poc_dataset

        record("render", render_poc_dataset(DATA / "dataset", args.products, seed=args.seed, workers=os.cpu_count()))
    base = [
        py,
        "-m",
        "experiments.poc",
        "base",
        "--config",
        args.config,
        "--vae-steps",
        str(args.vae_steps),
        "--vae-seconds",
        str(args.vae_seconds),
        "--vae-batch",
        str(args.vae_batch),
    ]
    if not step("base", base, DATA / "base.json"):
        return
    brackets = [
        py,
        "-m",
        "experiments.poc",
        "brackets",
        "--vae",
        str(DATA / "base"),
        "--out",
        str(DATA / "brackets.json"),
    ]
    if not step("brackets", brackets, DATA / "brackets.json"):
        return
    overfit = [
        py,
        "-m",
        "experiments.poc",
        "overfit",
        "--config",
        args.config,
        "--steps",
        str(args.overfit_steps),
        "--out",
        str(DATA / "overfit.json"),
    ] + [part for item in args.set for part in ("--set", item)]
    if not step("overfit", overfit, DATA / "overfit.json"):
        return
    if state["overfit"]["psnr_mask_db"] < OVERFIT_GATE_DB and not args.past_gates:
        print(
            f"[poc] gate 3 failed: {state['overfit']['psnr_mask_db']:.2f} dB < {OVERFIT_GATE_DB} dB inside the "
            "mask on the overfit clips; fix the model before any long run (--past-gates to go on anyway)",
            flush=True,
        )
        return
    for label, overrides in RUNS.items():
        command = [py, "-m", "flows.train", "--config", args.config, "--result", str(DATA / f"train_{label}.json")]
        for item in overrides["train"] + args.set:
            command += ["--set", item]
        if not step(f"train_{label}", command, DATA / f"train_{label}.json"):
            return
    for label, overrides in RUNS.items():
        command = [
            py,
            "-m",
            "flows.evaluate",
            "--model",
            state[f"train_{label}"]["model_uri"],
            "--config",
            args.config,
            "--no-register",
            "--train-clips",
            str(TRAIN_CLIPS_EVALUATED),
            "--result",
            str(DATA / f"evaluate_{label}.json"),
        ]
        for item in overrides["evaluate"]:
            command += ["--set", item]
        if not step(f"evaluate_{label}", command, DATA / f"evaluate_{label}.json"):
            return
    measure = [
        py,
        "-m",
        "experiments.poc",
        "measure",
        "--config",
        args.config,
        "--out",
        str(DATA / "measures"),
        *(f"--{label}={state[f'train_{label}']['model_dir']}" for label in RUNS),
    ]
    step("measure", measure, DATA / "measures" / "poc-measures.json")


def collect(state: dict, out: Path) -> None:
    """results.json, the MLflow database and what there is to look at (at most 8 files: the GPU
    tool's limit)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
    database = Path("data/mlflow/mlflow.db")
    if database.is_file():
        shutil.copy(database, out / "mlflow.db")
    for name in ("poc-measures-per-clip.jsonl", "poc-contact-sheet.png"):
        if (DATA / "measures" / name).is_file():
            shutil.copy(DATA / "measures" / name, out / name)
    samples = sorted(Path(state["train_A"]["run_dir"]).glob("samples/*.png")) if "train_A" in state else []
    if samples:
        shutil.copy(samples[-1], out / "samples-A-final.png")
    print(f"[poc] results so far in {out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser(
        "render",
        help="colourway studio rendered straight into data/poc/dataset, true masks (experiments/poc/render.py)",
    )
    render.add_argument("--products", type=int, default=1000)
    render.add_argument("--colourways", type=int, default=4)
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--workers", type=int, default=os.cpu_count())
    render.add_argument("--out", type=Path, default=DATA / "dataset", help="dataset root to create (new or empty)")
    brackets = commands.add_parser(
        "brackets", help="gate 1: mask-region PSNR brackets on the test clips (experiments/poc/brackets.py)"
    )
    brackets.add_argument("--dataset", type=Path, default=DATA / "dataset")
    brackets.add_argument("--vae", type=Path, help="VAE folder (or base folder with vae/) for the round trip")
    brackets.add_argument("--frames", type=int, default=17)
    brackets.add_argument("--stride", type=int, default=2)
    brackets.add_argument("--out", type=Path, help="write the figures as JSON here")
    base = commands.add_parser("base", help="write data/poc/base (trains the VAE: GPU)")
    base.add_argument("--vae-steps", type=int, default=3000, help="at most this many VAE steps")
    base.add_argument("--vae-seconds", type=float, default=300, help="and at most this long (it cannot resume)")
    base.add_argument("--vae-batch", type=int, default=16)
    base.add_argument("--config", default=CONFIG)
    overfit = commands.add_parser("overfit", help="gate 3: train on a few train clips, measure on them")
    overfit.add_argument("--clips", type=int, default=8)
    overfit.add_argument("--steps", type=int, default=300)
    overfit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    overfit.add_argument("--out", type=Path, default=DATA / "overfit.json")
    overfit.add_argument("--config", default=CONFIG)
    measure = commands.add_parser("measure", help="issue 14's measures of runs A and B on the test products")
    for label in RUNS:
        measure.add_argument(f"--{label}", required=True, help=f"model folder of run {label}")
    measure.add_argument("--out", type=Path, default=DATA / "measures")
    measure.add_argument("--config", default=CONFIG)
    report = commands.add_parser("report", help="loss curves, table and plot from a run's MLflow database")
    report.add_argument("--mlflow-db", required=True)
    report.add_argument("--out", required=True)
    cache = commands.add_parser(
        "step-cache",
        help="quality cost of the fast generation path on a trained model (GPU; experiments/poc/step_cache.py)",
    )
    cache.add_argument("--model", help="model URI or folder (default: run A's model, from data/poc/train_A.json)")
    cache.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    cache.add_argument("--steps", type=int, default=50)
    cache.add_argument("--max-clips", type=int)
    cache.add_argument("--out", default=os.environ.get("OUT", "data/poc/out"))
    run = commands.add_parser("gpu", help="the next steps of the experiment, until the deadline")
    run.add_argument("--deadline-s", type=float, default=540)
    run.add_argument("--products", type=int, default=1000)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--vae-steps", type=int, default=3000, help="at most this many VAE steps")
    run.add_argument("--vae-seconds", type=float, default=300, help="and at most this long (it cannot resume)")
    run.add_argument("--vae-batch", type=int, default=16)
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for the overfit run and both training runs, e.g. train.stage1.max_steps=2000",
    )
    run.add_argument("--overfit-steps", type=int, default=300)
    run.add_argument("--past-gates", action="store_true", help="train A and B even if the overfit gate fails")
    run.add_argument("--out", default=os.environ.get("OUT", "data/poc/out"))
    run.add_argument(
        "--config", default=CONFIG, help="the run config of every step (a copy with fewer steps for a dry run)"
    )
    args = parser.parse_args(argv)

    if args.command == "render":
        from experiments.poc.render import render_poc_dataset

        print(
            json.dumps(render_poc_dataset(args.out, args.products, args.colourways, args.seed, args.workers), indent=2)
        )
    elif args.command == "brackets":
        from experiments.poc.brackets import run_brackets

        run_brackets(args.dataset, args.vae, args.frames, args.stride, args.out)
    elif args.command == "base":
        from experiments.poc.base import build_base
        from models.device import resolve_device
        from tasks.training.run_config import load_run_config

        d = load_run_config(args.config).data
        info = build_base(
            DATA / "base",
            DATA / "dataset",
            d.frames,
            d.frame_stride,
            d.height,
            d.width,
            vae_steps=args.vae_steps,
            vae_seconds=args.vae_seconds,
            vae_batch=args.vae_batch,
            vae_lr=3e-4,
            device=resolve_device("auto").type,
        )
        (DATA / "base.json").write_text(json.dumps(info, indent=2) + "\n")
    elif args.command == "overfit":
        from experiments.poc.overfit import run_overfit

        result = run_overfit(DATA / "dataset", DATA / "overfit", args.clips, args.steps, args.set, args.config)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "measure":
        from experiments.poc.measure import measure as measure_runs
        from models.device import resolve_device
        from tasks.training.run_config import load_run_config

        result = measure_runs(
            {label: getattr(args, label) for label in RUNS},
            DATA / "dataset",
            load_run_config(args.config),
            args.out,
            device=resolve_device("auto").type,
        )
        print(json.dumps(result, indent=2))
    elif args.command == "step-cache":
        from experiments.poc.step_cache import measure_step_cache

        result = DATA / "train_A.json"
        if args.model is None and not result.is_file():
            parser.error(
                f"no --model, and {result} (run A's training result) does not exist: train run A "
                "first (python -m experiments.poc gpu) or pass --model"
            )
        from storage.tracking import ModelNotFoundError
        from tasks.training.model_store import IncompatibleCheckpointError

        model = args.model or json.loads(result.read_text())["model_uri"]
        try:
            measure_step_cache(model, args.thresholds, Path(args.out), steps=args.steps, max_clips=args.max_clips)
        except (ModelNotFoundError, IncompatibleCheckpointError) as error:
            parser.exit(2, f"error: {error}\n")
    elif args.command == "report":
        from experiments.poc.report import write_report

        print(write_report(Path(args.mlflow_db), Path(args.out)))
    else:
        gpu(args)


if __name__ == "__main__":
    main()
