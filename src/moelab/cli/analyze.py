"""`moelab analyze RUN_OR_CHECKPOINT`: expert specialisation on held-out data."""

from __future__ import annotations

import argparse
import json

from moelab.errors import ConfigError
from moelab.lab.specialization import AnalysisConfig, analyze_checkpoint, summary_lines


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="which experts each domain, token and position goes to",
        description="Route a held-out sample of each domain through a checkpoint and report, per MoE layer: "
        "domain x expert distribution and specialisation scores, vocabulary specialisation, routing "
        "consistency of consecutive tokens vs random routing, expert co-activation, and text coloured by "
        "first-choice expert (HTML). Writes analysis.json, analysis.html and plots. See docs/lab.md.",
    )
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", nargs="?", help="a run directory or its model.safetensors")
    p.add_argument("--traffic", metavar="LOG",
                   help="instead: routing statistics of recorded traffic, from `moelab serve --routing-log` "
                   "(JSONL) or `moelab generate --record-routing` (JSON); no checkpoint needed")
    p.add_argument("--num-experts", type=int, metavar="E",
                   help="--traffic: experts per layer, when the record does not say (default: from the record)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="held-out data from these files (default: the default corpus's validation split)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-data cache (default runs/cache/data)")
    p.add_argument("--tokens", type=int, default=8192, metavar="N", help="held-out tokens per domain (default 8192)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: the run directory)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.traffic is not None:
        return run_traffic(args)
    if args.path is None:
        raise ConfigError("give a RUN_OR_CHECKPOINT to analyse, or --traffic LOG")
    if args.num_experts is not None:
        raise ConfigError("--num-experts applies to --traffic only")
    cfg = AnalysisConfig(tokens_per_domain=args.tokens)
    result = analyze_checkpoint(args.path, data_paths=args.data, cache_dir=args.cache_dir, config=cfg,
                                out_dir=args.out)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print("\n".join(summary_lines(result)))
    out = args.out or "the run directory"
    print(f"\nwrote {', '.join(result.files.values())} in {out}")
    return 0


def run_traffic(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moelab.io import atomic_write_json
    from moelab.lab.traffic import analyze_traffic, plot_traffic_load, traffic_summary_lines

    if args.path is not None:
        raise ConfigError("--traffic analyses a routing log, not a checkpoint; drop RUN_OR_CHECKPOINT")
    for flag, given in (("--data", args.data), ("--cache-dir", args.cache_dir)):
        if given is not None:
            raise ConfigError(f"{flag} does not apply to --traffic")
    if args.num_experts is not None and args.num_experts < 1:
        raise ConfigError(f"--num-experts must be >= 1, got {args.num_experts}")
    result = analyze_traffic(args.traffic, num_experts=args.num_experts)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print("\n".join(traffic_summary_lines(result)))
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "traffic.json", result.to_dict())
        plot_traffic_load(result, out / "traffic_load.png")
        if not args.json:
            print(f"wrote traffic.json, traffic_load.png in {out}")
    return 0
