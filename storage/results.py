"""The result a command line prints and, with --result, writes as JSON (flows and torchrun ranks share it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_result_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result", default=None, help="also write the returned summary to this JSON file")


def emit_result(result: dict, path: str | None) -> dict:
    """Print the flow's summary as JSON and, when `path` is given, write it there too (scripts read it)."""
    text = json.dumps(result, indent=2, default=str)
    if path:
        Path(path).write_text(text + "\n")
    print(text)
    return result
