"""The GPU proof of concept (docs/poc.md): what its steps share."""

from pathlib import Path

CONFIG = "configs/poc-synthetic.yaml"
DATA = Path("data/poc")
# Run A: the photos as reference latents (the config). Run B: the same run with every sample's
# photos withheld (drop_product 0.85 + drop_both 0.15 = 1, text dropout kept at A's 15%), so no
# reference token ever reaches its video tokens; it is evaluated without photos too (product
# guidance 0 leaves the no-product branch alone), since it never learnt to read them.
RUNS = {
    "A": {"train": ["train.run_name=poc-A-photos"], "evaluate": []},
    "B": {
        "train": [
            "train.run_name=poc-B-no-photos",
            "model.objective.drop_product_prob=0.85",
            "model.objective.drop_both_prob=0.15",
            "model.objective.drop_text_prob=0.0",
        ],
        "evaluate": ["evaluate.product_guidance_scale=0.0"],
    },
}
