"""Config dtype names (mergebot.config.spec.DTYPE_NAMES) as torch dtypes, and back."""

from __future__ import annotations

import torch

from mergebot.config.spec import DTYPE_NAMES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a config's dtype name (`torch.` prefix allowed); None for None."""
    return None if name is None else TORCH_DTYPES[name.removeprefix("torch.")]


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")
