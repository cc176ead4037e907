"""The GPU proof of concept (docs/poc.md): what its steps share."""
from pathlib import Path

CONFIG = "configs/poc-synthetic.yaml"
DATA = Path("data/poc")
RUNS = {
    "A": ["train.run_name=poc-A-full"],
    "B": ["train.run_name=poc-B-no-photos", "model.objective.drop_product_prob=0.85",
          "model.objective.drop_both_prob=0.15", "model.objective.drop_text_prob=0.0"],
}
