"""Where models run: "auto" means CUDA when a GPU is visible, else the CPU (the one resolver the
flows, precompute, training and the segmenter share)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda if available else cpu; any other name as torch reads it ("cuda:1", "cpu")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
