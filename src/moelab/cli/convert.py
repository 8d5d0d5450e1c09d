"""`moelab convert`: Hugging Face folder -> moelab checkpoint, moelab -> Hugging Face, or either -> GGUF."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from moelab.cli.options import dtype_type, parse_size, torch_dtype
from moelab.errors import ConfigError

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # moelab.hf.gguf.GGUF_TYPES (not imported: --help stays light)

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face, moelab and GGUF (llama.cpp) formats",
        description="HF_DIR --to-moelab OUT, RUN_OR_CHECKPOINT --to-hf OUT_DIR, or RUN_OR_HF_DIR --to-gguf OUT.gguf.",
    )
    p.add_argument("source", help="a Hugging Face model folder, or a moelab run dir / model.safetensors")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-moelab", metavar="OUT", help="write a moelab checkpoint folder")
    target.add_argument("--to-hf", metavar="OUT_DIR", help="write a Hugging Face model folder")
    target.add_argument("--to-gguf", metavar="OUT.gguf", help="write a GGUF file llama.cpp loads (its llama arch with experts)")
    p.add_argument("--type", choices=GGUF_TYPES, help="--to-gguf: tensor type (default f32; norms and router stay f32)")
    p.add_argument("--max-shard-size", default=None, help="--to-hf: shard safetensors above this size (default 5GB)")
    p.add_argument("--tokenizer", help="tokenizer.json to include (default: the source's own)")
    p.add_argument("--dtype", type=dtype_type(("fp32", "bf16", "fp16")),
                   help="--to-hf / --to-moelab: weight dtype to write, fp32/float32, bf16/bfloat16 or fp16/float16 "
                   "(default: as loaded; --to-moelab: float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (--to-moelab: only a moelab run, moved aside until the new one is in place)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of a moelab run's weights (--to-hf, --to-gguf) (~1 s per 1.5 GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.hf import export_hf, load_hf, load_moelab, save_moelab

    _check_flags(args)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if args.to_gguf:
        from moelab.hf.gguf import export_gguf_from

        g = export_gguf_from(args.source, args.to_gguf, tokenizer_path=tokenizer, file_type=args.type or "f32",
                             overwrite=args.overwrite, verify=not args.no_verify)
        types = ", ".join(f"{n} {t}" for t, n in sorted(g.types.items()))
        errs = ", ".join(f"{t} {e:.2g}" for t, e in sorted(g.max_abs_err.items()))
        print(f"wrote GGUF {g.path} ({g.file_type}: {g.n_tensors} tensors, {types}; {g.n_bytes / 1e6:.1f} MB; "
              f"read back, max abs error {errs})")
        return 0
    if args.to_moelab:
        from moelab.io import atomic_dir
        from moelab.rundir import check_out_dir

        out = Path(args.to_moelab)
        check_out_dir(out, args.overwrite)  # before the (slow) load: a trained run is never lost silently
        dtype = torch_dtype(args.dtype or "fp32")
        imp = load_hf(args.source, dtype=dtype)
        from moelab.hf.loader import read_hf_config

        # The config.json is kept: a family moelab imports but cannot describe from its own
        # config (DeepSeek, gpt-oss, Llama 4, ...) exports back through it (`export_hf`).
        source = {"hf_dir": str(Path(args.source).resolve()), "model_type": imp.family,
                  "hf_config": read_hf_config(Path(args.source)), "hf_layout": imp.layout}
        with atomic_dir(out) as tmp:  # an existing run is moved aside and removed only once this one is in place
            save_moelab(imp.model, tmp, tokenizer_path=tokenizer or imp.tokenizer_path, source=source)
        size = (out / "model.safetensors").stat().st_size
        print(f"wrote moelab checkpoint {out} ({imp.family}, {imp.model.num_params():,} parameters, "
              f"{str(dtype).removeprefix('torch.')}, {size / 1e6:.1f} MB)")
        return 0
    loaded = load_moelab(args.source, verify=not args.no_verify)
    from moelab.rundir import read_run_config

    source = read_run_config(loaded.run_dir).get("source") or {} if loaded.run_dir else {}
    result = export_hf(
        loaded.model,
        args.to_hf,
        tokenizer_path=tokenizer or loaded.tokenizer_path,
        max_shard_size=parse_size(args.max_shard_size or "5GB"),
        dtype=torch_dtype(args.dtype) if args.dtype else None,
        overwrite=args.overwrite,
        hf_config=source.get("hf_config") if isinstance(source, dict) else None,
        hf_layout=source.get("hf_layout") if isinstance(source, dict) else None,
    )
    print(f"wrote Hugging Face {result.family} model {result.out_dir} ({len(result.files)} safetensors file(s))")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse an option the chosen target would ignore."""
    target = "--to-gguf" if args.to_gguf else "--to-hf" if args.to_hf else "--to-moelab"
    allowed = {"--to-gguf": {"type", "tokenizer", "overwrite", "no_verify"},
               "--to-hf": {"max_shard_size", "tokenizer", "dtype", "overwrite", "no_verify"},
               "--to-moelab": {"tokenizer", "dtype", "overwrite"}}[target]
    for name in ("type", "max_shard_size", "dtype", "overwrite", "no_verify"):
        if getattr(args, name) not in (None, False) and name not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to {target}")
