"""`moelab generate`: sample text from a moelab checkpoint or a Hugging Face folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        "seconds, counted in the decode rate printed; then ~1.1-1.3x faster per token; not with "
        "--record-routing)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from moelab.data.tokenizer import end_token_ids
    from moelab.hf import load_any
    from moelab.infer.generate import generate

    loaded = load_any(args.path, verify=not args.no_verify)
    tok_path = Path(args.tokenizer) if args.tokenizer else loaded.tokenizer_path
    if tok_path is None or not tok_path.is_file():
        raise ConfigError(f"{args.path}: no tokenizer.json found; pass --tokenizer PATH")
    tokenizer = Tokenizer.from_file(str(tok_path))
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in args.prompt]
    stop_ids = list(end_token_ids(tokenizer))
    single = len(prompts) == 1

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
    if single:
        sys.stdout.write("\n")
    else:
        for prompt, text in zip(args.prompt, result.texts or [], strict=True):
            print(f"{prompt}{text}\n---")
    print(
        f"[{result.new_tokens} new tokens, prefill {result.prefill_s * 1e3:.0f} ms, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    if args.record_routing:
        atomic_write_json(
            args.record_routing,
            {
                "source": str(args.path),
                "moe_layers": loaded.config.moe_layers,
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
