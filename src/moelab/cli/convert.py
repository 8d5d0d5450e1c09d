"""`moelab convert`: Hugging Face folder -> moelab checkpoint, or moelab -> Hugging Face."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch

from moelab.errors import ConfigError

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '64KiB' or a plain number of bytes (`flag` names the option in the error)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{flag}: cannot read {text!r}; expected e.g. 5GB, 500MB, 64KiB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and moelab formats",
        description="HF_DIR --to-moelab OUT, or RUN_OR_CHECKPOINT --to-hf OUT_DIR.",
    )
    p.add_argument("source", help="a Hugging Face model folder, or a moelab run dir / model.safetensors")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-moelab", metavar="OUT", help="write a moelab checkpoint folder")
    target.add_argument("--to-hf", metavar="OUT_DIR", help="write a Hugging Face model folder")
    p.add_argument("--max-shard-size", default="5GB", help="--to-hf: shard safetensors above this size (default 5GB)")
    p.add_argument("--tokenizer", help="tokenizer.json to include (default: the source's own)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="--to-hf: weight dtype to write (default: as loaded)")
    p.add_argument("--overwrite", action="store_true", help="--to-hf: replace a non-empty OUT_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.hf import export_hf, load_hf, load_moelab, save_moelab

    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if args.to_moelab:
        imp = load_hf(args.source)
        out = save_moelab(imp.model, args.to_moelab, tokenizer_path=tokenizer or imp.tokenizer_path,
                          source={"hf_dir": str(Path(args.source).resolve()), "model_type": imp.family})
        print(f"wrote moelab checkpoint {out} ({imp.family}, {imp.model.num_params():,} parameters)")
        return 0
    loaded = load_moelab(args.source)
    result = export_hf(
        loaded.model,
        args.to_hf,
        tokenizer_path=tokenizer or loaded.tokenizer_path,
        max_shard_size=parse_size(args.max_shard_size),
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
    )
    print(f"wrote Hugging Face {result.family} model {result.out_dir} ({len(result.files)} safetensors file(s))")
    return 0
