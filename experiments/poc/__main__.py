"""The PoC experiment of docs/poc.md: do product photos measurably put the product into the video?

    python -m experiments.poc dataset --products 150     # here (CPU): studio -> build-dataset
    python -m experiments.poc render --products 1000 --workers 16   # colourway studio -> dataset (issue 14)
    python -m experiments.poc brackets                   # gate 1 (CPU): mask-region PSNR brackets
    python -m experiments.poc gpu --deadline-s 540       # GPU: base, train A and B, evaluate both
    python -m experiments.poc step-cache                 # GPU: fast generation's quality cost on A

`gpu` does the next steps not yet done, each through the project's own flows in a subprocess,
and stops before the deadline (the GPU machine allows 10 minutes a command; run it again on the
same machine and it goes on: the train flow resumes its run from the last checkpoint):

1. base: data/poc/base (experiments/poc/base.py: a Wan VAE trained on the train clips, a small
   random Wan DiT, tiny text and image encoders);
2. train A (full model) and B (ablation: no product photos), same data, steps and seed;
3. evaluate A and B (test split + train clips), without registering;
4. results.json, the MLflow database and a contact sheet under --out.

Ablation B trains with every sample's product dropped (drop_product_prob 0.85 + drop_both_prob
0.15 = 1, text dropout kept at A's 15%): its product tokens are always the null (zeros), so the
product branch's output and the gradient of its zero-initialised gate are exactly 0 and the gate
never opens. At evaluation B is given the photos like A, and they change nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from experiments.poc import CONFIG, DATA, RUNS

TRAIN_CLIPS_EVALUATED = 16


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
        print(f"[poc] {name}: stopped at the deadline after {time.monotonic() - started:.0f} s; "
              "run again to go on", flush=True)
        return False
    print(f"[poc] {name}: done in {time.monotonic() - started:.0f} s", flush=True)
    return True


def gpu(args) -> None:
    """The pending steps until the deadline, then what exists so far under --out (also when the
    deadline cut the run short: the GPU machine's disk goes when it is given back)."""
    state_file = DATA / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        run_pending(state, state_file, args, time.monotonic() + args.deadline_s)
    finally:
        collect(state, Path(args.out))


def run_pending(state: dict, state_file: Path, args, deadline: float) -> None:
    py = sys.executable

    def record(key: str, result: Path) -> None:
        state[key] = json.loads(result.read_text())
        state_file.write_text(json.dumps(state, indent=2) + "\n")

    if "base" not in state:
        if not run_step("base", [py, "-m", "experiments.poc", "base", "--vae-steps", str(args.vae_steps),
                                 "--vae-batch", str(args.vae_batch)], deadline):
            return
        record("base", DATA / "base.json")
    for label, overrides in RUNS.items():
        if f"train_{label}" in state:
            continue
        result = DATA / f"train_{label}.json"
        command = [py, "-m", "flows.train", "--config", CONFIG, "--result", str(result)]
        for item in overrides + args.set:
            command += ["--set", item]
        if not run_step(f"train {label}", command, deadline):
            return
        record(f"train_{label}", result)
    for label in RUNS:
        if f"evaluate_{label}" in state:
            continue
        result = DATA / f"evaluate_{label}.json"
        command = [py, "-m", "flows.evaluate", "--model", state[f"train_{label}"]["model_uri"], "--config", CONFIG,
                   "--no-register", "--train-clips", str(TRAIN_CLIPS_EVALUATED), "--result", str(result)]
        if not run_step(f"evaluate {label}", command, deadline):
            return
        record(f"evaluate_{label}", result)


def collect(state: dict, out: Path) -> None:
    """results.json, the MLflow database, one archive of what there is to look at (the evaluated
    videos with their per-clip metrics, the training runs' sample sheets) and, once both runs are
    evaluated, the contact sheet. (The GPU tool brings back at most 8 files.)"""
    from experiments.poc.sheet import contact_sheet_png

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
    database = Path("data/mlflow/mlflow.db")
    if database.is_file():
        shutil.copy(database, out / "mlflow.db")
    with tarfile.open(out / "outputs.tar.gz", "w:gz") as archive:
        for label in RUNS:
            if f"evaluate_{label}" in state:
                archive.add(state[f"evaluate_{label}"]["folder"], arcname=f"evaluate_{label}")
            if f"train_{label}" in state:
                samples = Path(state[f"train_{label}"]["run_dir"]) / "samples"
                if samples.is_dir():
                    archive.add(samples, arcname=f"samples_{label}", filter=lambda t: None if t.name.endswith(".mp4") else t)
    if all(f"evaluate_{label}" in state for label in RUNS):
        contact_sheet_png(DATA / "dataset", {label: Path(state[f"evaluate_{label}"]["folder"]) for label in RUNS},
                          out / "poc-contact-sheet.png")
    print(f"[poc] results so far in {out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dataset = commands.add_parser("dataset", help="synthetic studio -> build-dataset under data/poc (CPU)")
    dataset.add_argument("--products", type=int, default=150)
    render = commands.add_parser("render", help="colourway studio rendered straight into data/poc/dataset, true "
                                                "masks (experiments/poc/render.py)")
    render.add_argument("--products", type=int, default=1000)
    render.add_argument("--colourways", type=int, default=4)
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--workers", type=int, default=os.cpu_count())
    render.add_argument("--out", type=Path, default=DATA / "dataset", help="dataset root to create (new or empty)")
    brackets = commands.add_parser("brackets", help="gate 1: mask-region PSNR brackets on the test clips "
                                                    "(experiments/poc/brackets.py)")
    brackets.add_argument("--dataset", type=Path, default=DATA / "dataset")
    brackets.add_argument("--vae", type=Path, help="VAE folder (or base folder with vae/) for the round trip")
    brackets.add_argument("--frames", type=int, default=17)
    brackets.add_argument("--stride", type=int, default=2)
    brackets.add_argument("--out", type=Path, help="write the figures as JSON here")
    base = commands.add_parser("base", help="write data/poc/base (trains the VAE: GPU)")
    base.add_argument("--vae-steps", type=int, default=1500)
    base.add_argument("--vae-batch", type=int, default=8)
    report = commands.add_parser("report", help="loss curves, table and plot from a run's MLflow database")
    report.add_argument("--mlflow-db", required=True)
    report.add_argument("--out", required=True)
    cache = commands.add_parser("step-cache", help="quality cost of the fast generation path on a trained "
                                                   "model (GPU; experiments/poc/step_cache.py)")
    cache.add_argument("--model", help="model URI or folder (default: run A's model, from data/poc/train_A.json)")
    cache.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    cache.add_argument("--steps", type=int, default=50)
    cache.add_argument("--max-clips", type=int)
    cache.add_argument("--out", default=os.environ.get("OUT", "data/poc/out"))
    run = commands.add_parser("gpu", help="the next steps of the experiment, until the deadline")
    run.add_argument("--deadline-s", type=float, default=540)
    run.add_argument("--vae-steps", type=int, default=1500)
    run.add_argument("--vae-batch", type=int, default=8)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override for both training runs, e.g. train.stage2.max_steps=2000")
    run.add_argument("--out", default=os.environ.get("OUT", "data/poc/out"))
    args = parser.parse_args(argv)

    if args.command == "dataset":
        from experiments.poc.dataset import build_poc_dataset
        summary = build_poc_dataset(DATA, args.products)
        print(json.dumps(summary, indent=2))
    elif args.command == "render":
        from experiments.poc.render import render_poc_dataset
        print(json.dumps(render_poc_dataset(args.out, args.products, args.colourways, args.seed, args.workers),
                         indent=2))
    elif args.command == "brackets":
        from experiments.poc.brackets import run_brackets
        run_brackets(args.dataset, args.vae, args.frames, args.stride, args.out)
    elif args.command == "base":
        from experiments.poc.base import build_base
        from tasks.precompute import resolve_device
        from tasks.run_config import load_run_config
        d = load_run_config(CONFIG).data
        info = build_base(DATA / "base", DATA / "dataset", d.frames, d.frame_stride, d.height, d.width,
                          vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_lr=3e-4, device=resolve_device("auto").type)
        (DATA / "base.json").write_text(json.dumps(info, indent=2) + "\n")
    elif args.command == "step-cache":
        from experiments.poc.step_cache import measure_step_cache
        result = DATA / "train_A.json"
        if args.model is None and not result.is_file():
            parser.error(f"no --model, and {result} (run A's training result) does not exist: train run A "
                         "first (python -m experiments.poc gpu) or pass --model")
        from storage.tracking import ModelNotFoundError
        from tasks.model_store import IncompatibleCheckpointError
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
