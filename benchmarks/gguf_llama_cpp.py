"""Benchmark: a moelab run exported to GGUF, run by llama.cpp, against moelab itself.

    python -m benchmarks.gguf_llama_cpp RUN_DIR [--types f32 q8_0] [--threads 2] [--json out.json]

For each GGUF type: the file size, whether llama.cpp tokenizes a text as our tokenizer
does, the largest logit difference over the text, the mean next-token NLL both ways,
and whether 32 greedy tokens agree. Fidelity only, not speed (that is the serve
benchmark's job). llama.cpp runs with a float32 KV cache so that the f32 file measures
the conversion and nothing else. Used for BENCHMARKS.md "GGUF export".
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import set_threads

TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
        "with her friends. One day she found a shiny red ball under a tree.")
N_GREEDY = 32


def _nll(logits_TV: np.ndarray, ids: list[int]) -> float:
    z = logits_TV[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a moelab run dir (float) with a byte-level BPE tokenizer.json")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import llama_cpp
    from tokenizers import Tokenizer

    from moelab.hf import load_any
    from moelab.hf.gguf import export_gguf
    from moelab.infer.generate import generate

    threads = set_threads(args.threads)
    loaded = load_any(args.run)
    model = loaded.model
    tok = Tokenizer.from_file(str(loaded.tokenizer_path))
    ids = tok.encode(TEXT).ids
    prompt = ids[:12]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    ours_greedy = generate(model, [prompt], max_new_tokens=N_GREEDY).token_ids[0]
    rows = []
    f32 = llama_cpp.GGML_TYPE_F32
    with tempfile.TemporaryDirectory() as tmp:
        for file_type in args.types:
            res = export_gguf(model, Path(tmp) / f"m-{file_type}.gguf", tokenizer_path=loaded.tokenizer_path,
                              file_type=file_type)
            llm = llama_cpp.Llama(model_path=str(res.path), logits_all=True, n_ctx=256, n_batch=256,
                                  n_threads=threads, type_k=f32, type_v=f32, verbose=False)
            same_tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
            greedy: list[int] = []
            for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                greedy.append(int(t))
                if len(greedy) == N_GREEDY:
                    break
            rows.append({
                "type": file_type, "mb": round(res.n_bytes / 1e6, 2), "tokenize_same": same_tokens,
                "logit_max_abs_diff": float(np.abs(theirs - ours).max()), "logit_std": float(ours.std()),
                "nll_moelab": _nll(ours, ids), "nll_llama_cpp": _nll(theirs, ids),
                "greedy_same": greedy == ours_greedy,
            })
            del llm
    cfg = model.cfg
    print(f"{args.run}: {model.num_params() / 1e6:.1f}M params, d={cfg.d_model}, L={cfg.n_layers}, "
          f"E={cfg.moe.num_experts if cfg.moe else 0}, K={cfg.moe.top_k if cfg.moe else 0}, V={cfg.vocab_size}; "
          f"{len(ids)} text tokens, {threads} threads, llama-cpp-python {llama_cpp.__version__}")
    print("| type | MB | tokenizes alike | logit max abs diff (std) | NLL moelab / llama.cpp | "
          f"{N_GREEDY} greedy tokens alike |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['mb']} | {r['tokenize_same']} | {r['logit_max_abs_diff']:.2g} ({r['logit_std']:.2f}) | "
              f"{r['nll_moelab']:.4f} / {r['nll_llama_cpp']:.4f} | {r['greedy_same']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"run": args.run, "threads": threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
