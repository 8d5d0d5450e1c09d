"""`moelab quantize`: a moelab run or Hugging Face folder -> a run dir with quantised experts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moelab.errors import ConfigError

FORMATS = ("bf16", "int8", "int4")
DEFAULT_GROUP_SIZE = 128


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantise a checkpoint's routed experts (bf16, int8, int4) into a new run directory",
        description="SRC (a moelab run dir or Hugging Face folder) -> OUT, a moelab run directory whose "
        "routed experts are bf16, int8 or int4 (round-to-nearest); everything else stays as loaded. "
        "`moelab generate OUT` runs it. See docs/quant.md.",
    )
    p.add_argument("source", metavar="SRC", help="a moelab run dir / model.safetensors, or a Hugging Face folder")
    p.add_argument("out", metavar="OUT", help="the run directory to write")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="what the experts become")
    p.add_argument("--group-size", type=int,
                   help=f"int4 only: inputs per scale and zero point (32, 64 or 128; default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--what", default="experts",
                   help="experts (the default): the routed experts only; all: also attention, dense FFNs, shared "
                   "experts and the LM head (not the routers, not a tied LM head); int8/int4 only")
    p.add_argument("--head-format", metavar="FORMAT",
                   help="int8: with --format int4 --what all, keep the LM head in int8 (llama.cpp's "
                   "--output-tensor-type; the head is most of int4's quality cost, see docs/quant.md)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an existing moelab run")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of a moelab run's weights (~1 s per 1.5 GB)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _format(args: argparse.Namespace):
    """The `QuantFormat` (or "bf16") the flags ask for, checked before anything is loaded."""
    from moelab.quant.linear import HEAD_FORMATS

    fmt = _body_format(args)
    if args.head_format is not None:
        if args.head_format not in HEAD_FORMATS:
            raise ConfigError(f"--head-format {args.head_format!r} is not a choice; allowed: {', '.join(HEAD_FORMATS)}")
        if args.fmt != "int4" or args.what != "all":
            raise ConfigError(f"--head-format needs --format int4 --what all (got --format {args.fmt} --what "
                              f"{args.what}): it keeps the LM head finer than the other int4 linears")
    return fmt


def _body_format(args: argparse.Namespace):
    from moelab.quant import QuantFormat

    if args.what not in ("experts", "all"):
        raise ConfigError(f"--what {args.what!r} is not a choice; allowed: experts, all")
    if args.what == "all" and args.fmt == "bf16":
        raise ConfigError("--what all --format bf16 is the whole model in bf16: use "
                          "`moelab convert SRC --to-moelab OUT --dtype bf16` instead")
    if args.fmt != "int4":
        if args.group_size is not None:
            raise ConfigError(f"--group-size applies to --format int4 only, not {args.fmt}")
        return args.fmt if args.fmt == "bf16" else QuantFormat(name=args.fmt)
    group = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    try:
        return QuantFormat(name="int4", group_size=group)
    except ConfigError as e:
        raise ConfigError(f"--group-size {group}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from moelab.hf import load_any
    from moelab.quant import QuantizedExperts, quantize_model
    from moelab.quant.checkpoint import check_out_dir, save_quantized
    from moelab.rundir import MODEL_FILE

    fmt = _format(args)
    src, out = Path(args.source), Path(args.out)
    if out.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise ConfigError(f"OUT {out} is SRC; write the quantised run to a new folder")
    check_out_dir(out, args.overwrite)  # before the (slow) load
    loaded = load_any(src, verify=not args.no_verify)
    if any(isinstance(m, QuantizedExperts) for m in loaded.model.modules()) or loaded.kind == "moelab-bf16":
        raise ConfigError(f"{src}: already quantised ({loaded.kind}); quantise the float checkpoint")
    try:
        report = quantize_model(loaded.model, fmt, what=args.what, head=args.head_format)
    except ConfigError as e:
        raise ConfigError(f"--group-size {fmt.group_size}: {e}" if args.fmt == "int4" else str(e)) from None
    if report.layers == 0:
        raise ConfigError(f"{src}: the model has no MoE layers; there are no experts to quantise")
    source = {"path": str(src.resolve()), "kind": loaded.kind}
    save_quantized(loaded.model, out, fmt=fmt, tokenizer_path=loaded.tokenizer_path, source=source,
                   overwrite=args.overwrite)
    file_bytes = (out / MODEL_FILE).stat().st_size
    summary = {
        "out": str(out),
        "format": report.format,
        "group_size": getattr(fmt, "group_size", None) if args.fmt == "int4" else None,
        "moe_layers": report.layers,
        "expert_bytes_before": report.bytes_before,
        "expert_bytes_after": report.bytes_after,
        "what": report.what,
        "linears": report.linears,
        "linears_left_float": list(report.linears_float),
        "head_format": report.head,
        "linear_bytes_before": report.linear_bytes_before,
        "linear_bytes_after": report.linear_bytes_after,
        "file_bytes": file_bytes,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        group = f" (group {summary['group_size']})" if summary["group_size"] else ""
        print(f"wrote {out}: {report.format}{group} experts in {report.layers} MoE layers, expert bytes "
              f"{_mb(report.bytes_before)} -> {_mb(report.bytes_after)} ({report.bytes_after / max(1, report.bytes_before):.2f}x), "
              f"{MODEL_FILE} {_mb(file_bytes)}")
        if report.what == "all":
            kept = f"; left float: {', '.join(report.linears_float)}" if report.linears_float else ""
            head = f"; the LM head in {report.head}" if report.head else ""
            print(f"  and {report.linears} other linears: {_mb(report.linear_bytes_before)} -> "
                  f"{_mb(report.linear_bytes_after)}{kept}{head}")
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
