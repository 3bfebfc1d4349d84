"""Byte sizes as people write and read them."""

from __future__ import annotations

import math


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def parse_size(text: str) -> int:
    """'5B', '500M', '1.5G', '1000' -> bytes (decimal suffixes K/M/B|G/T, as mergekit's --out-shard-size).
    ValueError (argparse's usage error) for anything but a finite size of at least one byte: `inf` would be an
    OverflowError traceback, and 0 or a negative size one shard per tensor."""
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    number, scale = (t[:-1], mult[t[-1]]) if t and t[-1] in mult else (t, 1)
    value = float(number) * scale
    if not (1 <= value < math.inf):
        raise ValueError(f"{text!r} is not a size of at least one byte")
    return int(value)
