"""`moelab generate`: sample text from a moelab checkpoint or a Hugging Face folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moelab.cli import _parallel
from moelab.cli.options import dtype_type
from moelab.errors import ConfigError
from moelab.io import atomic_write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint (moelab run dir or Hugging Face folder)",
        description="Greedy or sampled generation with a KV cache; streams a single prompt to the terminal.",
    )
    p.add_argument("path", help="moelab run dir / model.safetensors, or a Hugging Face model folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's own)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of a moelab run's weights (~1 s per 1.5 GB)")
    p.add_argument("--record-routing", metavar="OUT.json", help="write per-token expert routing as JSON")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a torch.compile'd static-shape step (the first call compiles for tens of "
        "seconds, printed apart and not counted in the decode rate; then ~1.1-1.3x faster per token; not with "
        "--record-routing)",
    )
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1 ...")
    p.add_argument("--dtype", type=dtype_type(("fp32", "bf16", "fp16")), default=None,
                   help="the model's dtype: fp32/float32 (default), bf16/bfloat16, fp16/float16")
    off = p.add_argument_group("offloading (moelab float, int8 and int4 runs)")
    off.add_argument(
        "--expert-memory", metavar="SIZE",
        help="keep at most SIZE of routed-expert weights resident (e.g. 2GB, 500MiB, bytes) and read the "
        "rest from model.safetensors on demand (docs/offload.md); with --device cuda, SIZE of GPU memory and "
        "the rest in pinned CPU memory; prints the cache stats at the end",
    )
    off.add_argument("--offload-policy", choices=("lru", "lfu"), default="lru", help="eviction policy (default lru)")
    off.add_argument("--offload-scope", choices=("layer", "global"), default="layer",
                     help="split the budget evenly over the MoE layers (default) or share one pool")
    _parallel.add_arguments(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """The flags' values, checked before anything is loaded or printed (messages name the flag)."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.compile and args.record_routing:
        raise ConfigError("--compile does not record routing (the compiled step returns logits only); "
                          "drop --compile or --record-routing")
    if any(not p for p in args.prompt):
        raise ConfigError("--prompt is empty; give some text")


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return _parallel.relaunch(args)
    ctx = _parallel.init(args)
    if ctx is not None and args.expert_memory is not None:
        raise ConfigError("--ep does not combine with --expert-memory (offloaded experts are not sharded)")
    from tokenizers import Tokenizer

    from moelab.cli.options import check_device, torch_dtype
    from moelab.data.tokenizer import end_token_ids
    from moelab.hf import load_any
    from moelab.infer.generate import generate

    check_args(args)
    store = None
    if args.expert_memory is not None:
        from moelab.cli.options import parse_size
        from moelab.offload import load_offloaded

        if args.compile:
            raise ConfigError("--compile does not support --expert-memory (the offloaded experts run eagerly)")
        if args.dtype:
            raise ConfigError("--expert-memory runs in the checkpoint's dtype (no --dtype)")
        # --device cuda: the expert cache on the GPU, the rest in pinned CPU memory
        loaded = load_offloaded(args.path, expert_memory=parse_size(args.expert_memory, "--expert-memory"),
                                policy=args.offload_policy, scope=args.offload_scope,
                                device=check_device(args.device))
        store = loaded.store
    else:
        loaded = load_any(args.path, verify=not args.no_verify, device=check_device(args.device))
        if args.dtype:
            loaded.model.to(torch_dtype(args.dtype))
    if ctx is not None:  # every rank holds the prompts and E/ep of the experts
        from moelab.dist.parallel import shard_experts

        shard_experts(loaded.model, ctx, global_batch=False)
    quiet = ctx is not None and not ctx.is_main
    tok_path = Path(args.tokenizer) if args.tokenizer else loaded.tokenizer_path
    if tok_path is None or not tok_path.is_file():
        raise ConfigError(f"{args.path}: no tokenizer.json found; pass --tokenizer PATH")
    tokenizer = Tokenizer.from_file(str(tok_path))
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in args.prompt]
    stop_ids = list(end_token_ids(tokenizer))
    single = len(prompts) == 1 and not quiet

    def stream(row: int, token: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if single:
        sys.stdout.write(args.prompt[0])
    result = generate(
        loaded.model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop_ids,
        stop_strings=args.stop or None,
        tokenizer=tokenizer,
        record_routing=bool(args.record_routing),
        stream=stream if single else None,
        compile=args.compile,
    )
    if quiet:
        return 0
    if single:
        sys.stdout.write("\n")
    else:
        for prompt, text in zip(args.prompt, result.texts or [], strict=True):
            print(f"{prompt}{text}\n---")
    compiled = f", compile {result.extras['compile_s']:.1f} s (not counted)" if "compile_s" in result.extras else ""
    print(
        f"[{result.new_tokens} new tokens, prefill {result.prefill_s * 1e3:.0f} ms, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s{compiled}]",
        file=sys.stderr,
    )
    if store is not None:
        print(f"[{store.stats().summary()}]", file=sys.stderr)
    if args.record_routing:
        atomic_write_json(
            args.record_routing,
            {
                "source": str(args.path),
                "moe_layers": loaded.config.moe_layers,
                "num_experts": loaded.config.moe.num_experts if loaded.config.moe is not None else 0,
                "prompts": [
                    {
                        "prompt": prompt,
                        "prompt_ids": ids,
                        "token_ids": new,
                        "tokens": [tokenizer.id_to_token(t) for t in new],
                        "routing": [r.to_dict() for r in rows],
                    }
                    for prompt, ids, new, rows in zip(args.prompt, prompts, result.token_ids, result.routing or [], strict=True)
                ],
            },
        )
    return 0
