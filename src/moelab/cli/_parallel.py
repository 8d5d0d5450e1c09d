"""``--ep`` / ``--nproc`` for the commands that run over torch.distributed (`train`,
`generate`, `serve`): the flags, the relaunch on N local ranks, and joining the process group."""

from __future__ import annotations

import argparse
import os

from moelab.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert parallelism (docs/dist.md)")
    g.add_argument("--ep", type=int, default=None, metavar="N",
                   help="spread each MoE layer's experts over N ranks (under torchrun, or with --nproc)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="launch N local processes (gloo on CPU), like torchrun --standalone --nproc-per-node N")


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def relaunch(args: argparse.Namespace, *, signals_to_rank0: bool = False) -> int:
    """`--nproc N`: this command again on N local ranks (`moelab.dist.launch`).

    ``signals_to_rank0`` (serve): Ctrl-C / SIGTERM go to rank 0 alone, which ends the job."""
    from moelab.dist.launch import launch
    from moelab.dist.mesh import check_sizes

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    ep = args.ep if args.ep is not None else args.nproc
    check_sizes(args.nproc, ep)  # before any process starts: one clear error
    argv = strip_nproc(args.argv)
    if args.ep is None:
        argv += ["--ep", str(ep)]
    launch(["-m", "moelab.cli.main", *argv], args.nproc, timeout_s=float("inf"), echo_rank0=True,
           threads=getattr(args, "threads", None) or 1, forward_signals=(0,) if signals_to_rank0 else None)
    return 0


def init(args: argparse.Namespace):
    """The `DistContext` when this process is one rank of an EP run (``--ep``, or launched
    with ``WORLD_SIZE > 1``), else None."""
    if args.ep is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from moelab.dist.mesh import init_dist

    return init_dist(args.ep if args.ep is not None else int(os.environ["WORLD_SIZE"]))
