"""`make demo`: synthetic product pages -> build-dataset, on embedded defaults.

Local Prefect (a temporary server, no setup), weights-free backends, everything under --data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo.studio import StudioConfig, generate_studio
from flows.build_dataset import build_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the ProductVideoGenerator demo end to end on synthetic data.")
    parser.add_argument("--data", default="data/demo", help="folder for everything the demo writes")
    parser.add_argument("--products", type=int, default=12, help="synthetic products to generate")
    args = parser.parse_args(argv)
    data = Path(args.data).resolve()
    source, truth, dataset = data / "source", data / "truth", data / "dataset"

    if not (source / "products.csv").exists():
        print(f"writing {args.products} synthetic products to {source} (ground truth in {truth})")
        generate_studio(source, truth, StudioConfig(num_products=args.products))
    summary = build_dataset(source=str(source), output=str(dataset), segmenter="classic", background_removal="classic")

    print(
        f"\nDataset: {dataset}\n"
        f"  dataset.json, manifests/*.parquet (rejects: manifests/rejects.parquet)\n"
        f"  clips per split: {summary['clips_per_split']}\n"
        f"Prefect runs and artifacts: run `prefect server start` (PREFECT_HOME={Path('data/prefect').resolve()}) "
        "and open http://127.0.0.1:4200"
    )


if __name__ == "__main__":
    main()
