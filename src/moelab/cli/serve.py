"""`moelab serve`: an OpenAI-compatible HTTP server (continuous batching) for a checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moelab.cli import _parallel
from moelab.cli.options import dtype_type
from moelab.errors import ConfigError, MoelabError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="POST /v1/completions and /v1/chat/completions (streaming with SSE), GET /v1/models, "
        "/health and /metrics (Prometheus). See docs/serve.md.",
    )
    p.add_argument("model", metavar="MODEL", help="moelab run dir / model.safetensors, or a Hugging Face folder")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--api-key", default=os.environ.get("MOELAB_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                     "(default: $MOELAB_API_KEY; none: no auth)")
    net.add_argument("--served-model-name", help="the model id clients send (default: MODEL as given)")
    eng = p.add_argument_group("engine")
    eng.add_argument("--max-num-seqs", type=int, default=8, help="concurrent running requests (slots)")
    eng.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step")
    eng.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    eng.add_argument("--max-len", type=int, help="columns per slot: prompt + max_tokens (default: the model's max_seq_len)")
    eng.add_argument("--batching", choices=("continuous", "dynamic"), default="continuous",
                     help="continuous (default): admit into any free slot every step; dynamic: request-level "
                     "batches that run to completion (for comparison; docs/serve.md)")
    eng.add_argument("--batch-window", type=float, default=0.0, metavar="S",
                     help="dynamic batching: how long a batch waits for more requests after its first (default 0)")
    eng.add_argument("--dtype", type=dtype_type(("fp32", "bf16")), default=None,
                     help="cast the model: fp32/float32 or bf16/bfloat16 (half the bytes per step; fast where the "
                     "CPU has native bf16, moelab.hardware) (default: as loaded)")
    eng.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    eng.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds running requests get to finish (then they end 'shutdown')")
    off = p.add_argument_group("offloading (moelab float, int8 and int4 runs; docs/offload.md)")
    off.add_argument("--expert-memory", metavar="SIZE",
                     help="keep at most SIZE of routed-expert weights resident (e.g. 2GB) and read the rest "
                     "from model.safetensors on demand; /metrics shows the cache")
    off.add_argument("--offload-policy", choices=("lru", "lfu"), default="lru", help="eviction policy (default lru)")
    off.add_argument("--offload-scope", choices=("layer", "global"), default="layer",
                     help="split the budget evenly over the MoE layers (default) or share one pool")
    p.add_argument("--routing-log", metavar="LOG.jsonl",
                   help="append every finished request's per-token routing here (for `moelab analyze --traffic`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --routing-log")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's own)")
    _parallel.add_arguments(p)  # rank 0 serves and schedules; every rank runs each step's forward
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.overwrite and args.routing_log is None:
        raise ConfigError("--overwrite applies to --routing-log only")
    if args.expert_memory is not None and (args.ep is not None or args.nproc is not None):
        raise ConfigError("--ep/--nproc do not combine with --expert-memory (offloaded experts are not sharded)")
    if args.nproc is not None:
        # Ctrl-C / SIGTERM go to rank 0 alone: it drains, then tells the other ranks to stop.
        return _parallel.relaunch(args, signals_to_rank0=True)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    from moelab.hf import load_any
    from moelab.serve.engine import EngineConfig

    # The engine's settings are checked before the model is loaded (errors name the flags).
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                          max_queue=args.max_queue, max_len=args.max_len, batching=args.batching,
                          batch_window=args.batch_window)
    ctx = _parallel.init(args)
    if ctx is not None:
        return _run_ep(args, config, ctx)
    store = None
    if args.expert_memory is not None:
        from moelab.cli.options import parse_size
        from moelab.offload import load_offloaded

        loaded = load_offloaded(args.model, expert_memory=parse_size(args.expert_memory, "--expert-memory"),
                                policy=args.offload_policy, scope=args.offload_scope)
        store = loaded.store
    else:
        loaded = load_any(args.model)
    tok_path = Path(args.tokenizer) if args.tokenizer else loaded.tokenizer_path
    if tok_path is None or not Path(tok_path).is_file():
        raise ConfigError(f"{args.model}: no tokenizer.json found; pass --tokenizer PATH")
    tokenizer = Tokenizer.from_file(str(tok_path))
    if args.dtype is not None:
        if store is not None:
            raise ConfigError("--dtype does not combine with --expert-memory (offloaded experts keep the file's dtype)")
        from moelab.cli.options import torch_dtype

        loaded.model.to(torch_dtype(args.dtype))
    _serve(args, config, loaded, tokenizer, Path(tok_path), store=store)
    return 0


def _serve(args, config, loaded, tokenizer, tok_path: Path, *, store=None, executor=None) -> None:
    """The engine, the app and uvicorn, until the server stops (this process, or rank 0)."""
    from moelab.serve.app import create_app
    from moelab.serve.chat import load_chat_template
    from moelab.serve.engine import Engine
    from moelab.serve.server import make_server

    engine = Engine(loaded.model, config, tokenizer=tokenizer, executor=executor)
    name = args.served_model_name or args.model
    routing_log = None
    if args.routing_log is not None:
        from moelab.serve.routing_log import RoutingLog

        moe = loaded.model.cfg.moe
        routing_log = RoutingLog(args.routing_log, num_experts=moe.num_experts if moe is not None else 0, model=name,
                                 overwrite=args.overwrite)

    app = create_app(engine, tokenizer, name, api_key=args.api_key,
                     chat_template=load_chat_template(tok_path), drain_timeout_s=args.drain_timeout,
                     offload_store=store, routing_log=routing_log)
    server = make_server(app, host=args.host, port=args.port)

    def lost(message: str) -> None:  # the engine can run no more steps (an EP rank is gone): stop serving
        server.should_exit = True

    engine.on_lost = lost
    try:
        server.run()
    finally:
        engine.shutdown(drain_timeout_s=0)  # no-op after a drain; else ends what is left, tells EP followers
    if engine.lost is not None:
        raise MoelabError(f"the engine stopped: {engine.lost}; a launcher names the rank that failed")


def _run_ep(args, config, ctx) -> int:
    """One rank of ``moelab serve --ep N``: rank 0 serves, the others follow its plans."""
    import signal

    from tokenizers import Tokenizer

    from moelab.dist.mesh import shutdown
    from moelab.dist.parallel import shard_experts
    from moelab.hf import load_any
    from moelab.serve.ep import PlanBroadcaster, follow

    if ctx.dp_size != 1:
        raise ConfigError(f"moelab serve needs --ep equal to the number of processes ({ctx.world_size}); "
                          f"got --ep {ctx.ep_size} (data-parallel serving is not supported)")
    try:
        loaded = load_any(args.model)
        if args.dtype is not None:
            from moelab.cli.options import torch_dtype

            loaded.model.to(torch_dtype(args.dtype))
        shard_experts(loaded.model, ctx, global_batch=False)  # refuses quantised experts by name
        if not ctx.is_main:
            # Rank 0 alone decides when the job ends (its drain, then a shutdown plan): a
            # signal to every rank (torchrun forwards one to all, a terminal's Ctrl-C reaches
            # a whole process group) must not end a follower while rank 0 drains through it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            follow(loaded.model, config, ctx)
            return 0
        tok_path = Path(args.tokenizer) if args.tokenizer else loaded.tokenizer_path
        if tok_path is None or not Path(tok_path).is_file():
            raise ConfigError(f"{args.model}: no tokenizer.json found; pass --tokenizer PATH")
        tokenizer = Tokenizer.from_file(str(tok_path))
        executor = PlanBroadcaster(loaded.model, config, ctx)
        E = loaded.model.cfg.moe.num_experts if loaded.model.cfg.moe is not None else 0
        print(f"[expert parallel: {ctx.ep_size} ranks, {E // ctx.ep_size} of {E} experts per MoE layer on each; "
              "rank 0 serves]", file=sys.stderr, flush=True)
        try:
            _serve(args, config, loaded, tokenizer, Path(tok_path), executor=executor)
        finally:
            executor.close()  # whatever happened on rank 0, the followers return
        return 0
    finally:
        shutdown()
