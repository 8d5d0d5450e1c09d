"""`moelab playground`: the interactive MoE lab in the browser (size, route, break, compare).

Thin layer over `moelab.playground`: check the flags, build the app, run uvicorn until
Ctrl-C, which stops a training run cooperatively (checkpointed, resumable) before the
server exits.
"""

from __future__ import annotations

import argparse
import logging
import threading
import webbrowser
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "playground",
        help="the interactive MoE lab in the browser: size it, route it, break it, compare",
        description="Serve the playground page and its JSON API locally (docs/playground.md). The server "
        "reads only --runs and the --models folders; Break runs are ordinary lab experiment folders "
        "under --runs (`moelab report RUNS` reads them).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--runs", default="runs/playground", metavar="DIR",
                   help="folder for Break runs, also read by Route and Compare (default runs/playground)")
    p.add_argument("--models", nargs="+", default=[], metavar="DIR",
                   help="folders of trained runs or imported checkpoints for Route and Compare")
    p.add_argument("--max-queue", type=int, default=8, metavar="N", help="Break runs that may wait (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.playground.app import create_app, make_server
    from moelab.playground.config import PlaygroundConfig

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    for d in args.models:
        if not Path(d).is_dir():
            raise ValueError(f"--models: {d} is not a folder")
    if Path(args.runs).exists() and not Path(args.runs).is_dir():
        raise ValueError(f"--runs: {args.runs} is a file, not a folder")
    cfg = PlaygroundConfig(runs_dir=args.runs, model_dirs=tuple(args.models), max_queue=args.max_queue)
    server = make_server(create_app(cfg), host=args.host, port=args.port,
                         log_level="debug" if args.verbose else "info")
    url = f"http://{args.host}:{args.port}/"
    logger.info("moelab playground on %s (runs in %s; Ctrl-C stops, a training run is checkpointed)", url,
                cfg.runs_dir)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("bound to %s: anyone who can reach this address can start training runs", args.host)
    if args.open:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    server.run()
    return 0
