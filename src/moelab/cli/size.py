"""`moelab size`: parameters, compute and memory of MoE (and dense) models.

Thin layer over `moelab.accounting`: resolve each name or path to a spec, build
the report dicts, print them as a table or JSON.
"""

from __future__ import annotations

import argparse
import json

from moelab.accounting.memory import BYTES_PER_PARAM
from moelab.accounting.report import preset_lines, render_table, resolve, size_report
from moelab.cli.options import dtype_type


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "size",
        help="exact parameters, FLOPs and memory of any MoE model",
        description="Exact total/active parameters, FLOPs per token, weight and KV-cache "
        "memory and GPU count of presets or Hugging Face config.json files. "
        "Several models are laid side by side. Conventions: docs/size.md.",
    )
    p.add_argument("models", nargs="*", metavar="NAME_OR_PATH",
                   help="preset name (see --list), config.json, or a model folder")
    p.add_argument("--list", action="store_true", help="list presets and exit")
    p.add_argument("--dtype", default="bf16", type=dtype_type(tuple(BYTES_PER_PARAM)),
                   help="dtype for serving memory and the KV cache: fp32/float32, bf16/bfloat16 (default), "
                   "fp16/float16, fp8, int4")
    p.add_argument("--context", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences in the KV cache (default 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                   help="memory per GPU in GB (1e9 bytes) for min GPUs (default 80)")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="expert parallelism over N ranks: all-to-all bytes per token per MoE layer "
                        "(dispatch + combine, bf16) and the weights per rank (docs/dist.md)")
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="with --ep: the ranks spread over N nodes, for the cross-node share (default 1)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory of the machine to run on (e.g. 24GB): per moelab format, whether the weights fit "
                        "resident, else the --expert-memory budget that offloading leaves for the experts")
    p.add_argument("--json", action="store_true", help="print JSON (an object, or a list for several models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(preset_lines()))
        return 0
    if args.nodes != 1 and args.ep is None:
        raise ValueError("--nodes needs --ep N")
    if not args.models:
        raise ValueError("give at least one preset name or config path (see `moelab size --list`)")
    memory_gb = None
    if args.memory is not None:
        from moelab.cli.options import parse_size

        memory_gb = parse_size(args.memory, "--memory") / 1e9
        if memory_gb <= 0:
            raise ValueError(f"--memory must be > 0, got {args.memory!r}")
    reports = []
    for name in args.models:
        spec, source, preset = resolve(name)
        reports.append(
            size_report(
                spec, source=source, preset=preset, dtype=args.dtype, context=args.context,
                batch=args.batch, gpu_memory_gb=args.gpu_memory, ep=args.ep, nodes=args.nodes,
                memory_gb=memory_gb,
            )
        )
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        print(render_table(reports))
    return 0
