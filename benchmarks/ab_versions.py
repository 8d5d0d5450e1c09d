"""Benchmark: this checkout's MoE layer and eager decode against an older revision's, in
one process, interleaved (the before/after check of a refactor).

    python -m benchmarks.ab_versions --base 126b3b9 [--threads 2] [--shapes fine decode ...] [--engine-rounds 8]

The base revision's ``src/moelab`` is copied out of git into a temporary folder as a
package named ``moelab_base`` (imports and custom-op namespaces renamed), so both versions
live in the same process: same weights (the base model loads the new one's state dict),
same inputs, calls alternating with the order swapped every round, medians. Separate
processes measured minutes apart differ by +-15% on the shared 2-core machines; this
does not. Used for BENCHMARKS.md "The seams refactor".
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import set_threads

# name: (D, F, E, K, T)
SHAPES = {
    "coarse": (512, 1792, 8, 2, 4096),
    "fine": (512, 256, 64, 8, 4096),
    "very_fine": (512, 128, 128, 8, 2048),
    "decode": (512, 1792, 8, 2, 16),
    "decode_fine": (512, 256, 64, 8, 16),
    "token1": (512, 1792, 8, 2, 1),
    "tiny_train": (128, 256, 8, 2, 1024),
}


def export_base(rev: str, dest: Path) -> None:
    """``src/moelab`` of `rev` as package ``moelab_base`` under `dest`."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                               text=True).stdout.strip())
    files = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "--name-only", rev, "src/moelab"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if not name.endswith(".py"):
            continue
        text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{name}"], check=True,
                              capture_output=True, text=True).stdout
        text = re.sub(r"\bmoelab\.", "moelab_base.", text)
        text = re.sub(r"\bfrom moelab import\b", "from moelab_base import", text)
        text = text.replace('"moelab::', '"moelab_base::').replace("torch.ops.moelab.", "torch.ops.moelab_base.")
        out = dest / "moelab_base" / Path(name).relative_to("src/moelab")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")


def _alternate(fns: dict[str, object], rounds: int) -> dict[str, float]:
    ts: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order if r % 2 else order[::-1]:
            t = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def layer_ab(base, new, name: str) -> list[str]:
    D, F, E, K, T = SHAPES[name]
    torch.manual_seed(0)
    m_new = new.MoE(new.MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K))
    m_new.reset_parameters(std=0.05)
    m_base = base.MoE(base.MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K))
    m_base.load_state_dict(m_new.state_dict())
    x, g = torch.randn(1, T, D), torch.randn(1, T, D)
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        def run(m, pass_=pass_):
            if pass_ == "fwd":
                with torch.no_grad():
                    m(x)
                return
            xg = x.clone().requires_grad_(True)
            for p in m.parameters():
                p.grad = None
            (m(xg).output * g).sum().backward()

        fns = {"base": lambda: run(m_base), "new": lambda: run(m_new)}
        _alternate(fns, 2)
        ms = _alternate(fns, 30 if T <= 1024 else 8)
        rows.append(f"| {name} {(D, F, E, K, T)} | {pass_} | {ms['base']:.2f} | {ms['new']:.2f} | "
                    f"{ms['base'] / ms['new']:.3f}x |")
    return rows


def decode_models(base_pkg: str):
    """(base, new) 212.8M Mixtral-style models of benchmarks/decode.py with the same weights."""
    bm, bmoe = importlib.import_module(f"{base_pkg}.model"), importlib.import_module(f"{base_pkg}.moe")
    import moelab.model as nm
    import moelab.moe as nmoe

    def cfg(M, Mo):
        moe = Mo.MoEConfig(d_model=768, d_expert=1024, num_experts=8, top_k=2)
        return M.ModelConfig(vocab_size=32000, d_model=768, n_layers=8, n_heads=12, n_kv_heads=4, d_ff=2048,
                             moe=moe, max_seq_len=512)

    torch.manual_seed(0)
    new_model = nm.Transformer(cfg(nm, nmoe)).eval()
    base_model = bm.Transformer(cfg(bm, bmoe)).eval()
    base_model.load_state_dict(new_model.state_dict())
    return base_model, new_model


def decode_ab(base_pkg: str, rounds: int) -> list[str]:
    """Eager `generate` of the 212.8M Mixtral-style model of benchmarks/decode.py."""
    bgen = importlib.import_module(f"{base_pkg}.infer.generate").generate
    from moelab.infer.generate import generate as ngen

    base_model, new_model = decode_models(base_pkg)
    rows = []
    for B in (1, 8):
        prompts = [[(7 * i + j) % 32000 for j in range(32)] for i in range(B)]
        ts: dict[str, list[float]] = {"base": [], "new": []}
        for r in range(rounds):
            pairs = [("base", bgen, base_model), ("new", ngen, new_model)]
            for k, gen, m in pairs if r % 2 else pairs[::-1]:
                res = gen(m, prompts, max_new_tokens=24)
                if r:
                    ts[k].append(res.decode_s / res.decode_steps * 1e3)
        b, n = statistics.median(ts["base"]), statistics.median(ts["new"])
        rows.append(f"| eager decode, batch {B} | ms/step | {b:.2f} | {n:.2f} | {b / n:.3f}x |")
    return rows


def engine_ab(base_pkg: str, rounds: int) -> list[str]:
    """The serving engine (in process, stepped by `run_to_completion`) on the decode model:
    8 requests of 32 prompt tokens and 16 new ones at 8 slots; wall time per engine step."""
    beng, btypes = importlib.import_module(f"{base_pkg}.serve.engine"), importlib.import_module(f"{base_pkg}.serve.types")
    import moelab.serve.engine as neng
    import moelab.serve.types as ntypes

    base_model, new_model = decode_models(base_pkg)
    prompts = [[(7 * i + j) % 32000 for j in range(32)] for i in range(8)]

    def run(eng, types, model) -> tuple[float, list]:
        engine = eng.Engine(model, eng.EngineConfig(max_num_seqs=8, max_len=64))
        reqs = [types.GenerationRequest(prompt_ids=tuple(p), max_tokens=16) for p in prompts]
        t = time.perf_counter()
        events = eng.run_to_completion(engine, reqs)
        ms = (time.perf_counter() - t) / engine.stats().steps * 1e3
        return ms, [[tok for e in events[r.request_id] for tok in e.token_ids] for r in reqs]

    ts: dict[str, list[float]] = {"base": [], "new": []}
    tokens = {}
    for r in range(rounds + 1):
        pairs = [("base", beng, btypes, base_model), ("new", neng, ntypes, new_model)]
        for k, eng, types, m in pairs if r % 2 else pairs[::-1]:
            ms, tokens[k] = run(eng, types, m)
            if r:  # the first round warms up
                ts[k].append(ms)
    b, n = statistics.median(ts["base"]), statistics.median(ts["new"])
    same = "same tokens" if tokens["base"] == tokens["new"] else "DIFFERENT tokens"
    return [f"| serving engine, 8 requests ({same}) | ms/step | {b:.2f} | {n:.2f} | {b / n:.3f}x |"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. 126b3b9)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--decode-rounds", type=int, default=10, help="0 skips the decode comparison")
    ap.add_argument("--engine-rounds", type=int, default=0, help="the serving engine's step (0: skipped)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_base(args.base, Path(tmp))
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"--base {args.base!r}: git cannot read src/moelab at that revision "
                             f"({((e.stderr or '').strip().splitlines() or [str(e)])[-1]})") from None
        sys.path.insert(0, tmp)
        base = importlib.import_module("moelab_base.moe")
        import moelab.moe as new

        print(f"| what | pass | base {args.base} ms | this checkout ms | base/new |")
        print("|---|---|---|---|---|")
        for name in args.shapes:
            for row in layer_ab(base, new, name):
                print(row, flush=True)
        if args.decode_rounds:
            for row in decode_ab("moelab_base", args.decode_rounds):
                print(row, flush=True)
        if args.engine_rounds:
            for row in engine_ab("moelab_base", args.engine_rounds):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
