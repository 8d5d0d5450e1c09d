"""Option types shared by the subcommands: one spelling of dtypes and devices everywhere.

Torch-free at import (``moelab size`` uses it and must start without torch); the torch
dtype is looked up only when asked for (`torch_dtype`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from moelab.errors import ConfigError

# Every spelling a user may type -> the short name the commands use.
DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "f32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16",
    "fp8": "fp8", "float8": "fp8",
    "int4": "int4",
}
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_type(allowed: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse ``type`` accepting every spelling of the short names in `allowed`
    (``bf16`` and ``bfloat16`` alike) and returning the short name."""

    def parse(text: str) -> str:
        short = DTYPE_ALIASES.get(text.strip().lower())
        if short not in allowed:
            spellings = ", ".join(f"{s}/{TORCH_NAMES[s]}" if s in TORCH_NAMES else s for s in allowed)
            raise argparse.ArgumentTypeError(f"{text!r} is not a dtype this command takes; expected {spellings}")
        return short

    parse.__name__ = "dtype"  # argparse names the type in its message: "invalid dtype value"
    return parse


def precision_type(text: str) -> str:
    """`moelab train --precision`: ``auto``, or fp32 / bf16 in any spelling."""
    if text.strip().lower() == "auto":
        return "auto"
    return dtype_type(("fp32", "bf16"))(text)


precision_type.__name__ = "precision"


def torch_dtype(short: str):
    """The torch dtype of a short name from `dtype_type` (imports torch)."""
    import torch

    return getattr(torch, TORCH_NAMES[short])


def check_device(name: str) -> str:
    """`name` if torch can run there (``cpu``, ``cuda``, ``cuda:N``); a `ConfigError` naming
    ``--device`` otherwise (imports torch)."""
    import torch


    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only cpu and cuda are supported")
    return name


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '64KiB' or a plain number of bytes (`flag` names the option in the error)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{flag}: cannot read {text!r}; expected e.g. 5GB, 500MB, 64KiB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
