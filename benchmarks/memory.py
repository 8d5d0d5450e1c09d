"""Benchmark: resident memory and decode speed with the routed experts offloaded.

    python -m benchmarks.memory --json runs/bench/memory.json [--quick]

A moelab MoE of ~175M parameters (random weights, experts ~85% of the bytes) is saved as
a run directory in a temporary folder. Then one child process per case runs `generate`
(greedy, batch 1, a prompt of ``--prompt-len`` tokens, ``--new-tokens`` new ones) on it:
the fully resident model (`moelab.rundir.load_model`), and `load_offloaded` with
``expert_memory`` = 100 / 50 / 25 / 12.5 % of the expert bytes for each policy. Each
child does one warm-up generation (thread pools; the store's stats are reset after it),
then ``--repeats`` timed ones (median decode tokens/s), and reports its peak RSS
(``VmHWM`` of /proc/self/status, read at the end of the child) with the store's stats.

The contract compared against: peak RSS <= the child's RSS before loading (python +
torch) + non-expert weights + the expert bytes the store held (its peak; <= the budget,
less when fewer experts were ever routed to) + slack; the slack printed is the
difference (activations, KV cache, code pages first touched, the loader's transient
peak). The cases run in ``--rounds`` interleaved rounds; each keeps its fastest round.

``--quant int8|int4`` (with ``--what experts|all``) measures the same cases on a quantised
copy of the run (`moelab quantize`, int4 groups of ``--group-size``): the resident model is
then `load_quantized`'s, the offloaded store holds quantised experts, and the fractions are
of the quantised expert bytes.

Page cache: warm by default (the file was just written and every case reads it, so a miss
is a copy from the page cache). ``--cold`` adds each budget with LRU and a cold page
cache: the file's pages are dropped at the start (``posix_fadvise(DONTNEED)``) and after
every expert read (`ExpertStore(page_cache="drop")`), so every miss is a read from the
disk, as on a machine whose memory holds neither the experts nor the file. (On a VM the
"disk" may be cached by the host; the measured read rate, ``bytes_read / stall_s``, says.)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.memory")

FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(args) -> None:
    before = _status()
    import torch

    from moelab.infer.generate import generate

    torch.set_num_threads(args.threads)
    before = _status()  # python + torch, before any weights
    t0 = time.perf_counter()
    store = None
    if args.budget == "resident":
        from moelab.hf import load_any

        model = load_any(args.run).model  # a float or a quantised run
    else:
        from moelab.offload import load_offloaded

        off = load_offloaded(args.run, expert_memory=int(args.budget), policy=args.policy,
                             page_cache=args.page_cache, prefetch=args.prefetch_child)
        model, store = off.model, off.store
        if args.page_cache == "drop":
            store.file.drop_cached_pages()  # cold from the first read on
    load_s = time.perf_counter() - t0
    after_load = _status()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    generate(model, [prompt], max_new_tokens=4)  # warm-up
    if store is not None:
        store.reset_stats()
    rates, tokens = [], None
    for _ in range(args.repeats):
        res = generate(model, [prompt], max_new_tokens=args.new_tokens)
        rates.append(res.decode_tokens_per_s)
        tokens = tokens or res.token_ids
    end = _status()
    print(json.dumps({
        "budget": args.budget, "policy": args.policy if store is not None else None,
        "page_cache": args.page_cache if store is not None else None,
        "prefetch": args.prefetch_child if store is not None else None,
        "decode_tok_s": statistics.median(rates), "decode_tok_s_all": rates, "load_s": load_s,
        "rss_before_load": before["VmRSS"], "rss_after_load": after_load["VmRSS"], "vmhwm": end["VmHWM"],
        "rss_end": end["VmRSS"], "rss_file_end": end["RssFile"], "token_ids": tokens,
        "stats": store.stats().to_dict() if store is not None else None,
    }))


def build(args, folder: Path) -> dict:
    import torch

    from moelab.model import ModelConfig, Transformer
    from moelab.moe import MoEConfig
    from moelab.rundir import save_model

    moe = MoEConfig(d_model=args.d_model, d_expert=args.d_expert, num_experts=args.experts, top_k=args.top_k)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64,
                      n_kv_heads=4, d_ff=args.d_expert, moe=moe, max_seq_len=1024)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_model(model, folder)
    expert = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() * 4 for p in model.parameters())
    return {"config": cfg.to_dict(), "params": model.num_params(), "expert_bytes": expert,
            "non_expert_bytes": total - expert, "one_expert_bytes": expert // (args.layers * args.experts)}


def describe(run: Path) -> dict:
    """`build`'s figures for an existing float run (``--model-run``)."""
    from moelab.rundir import load_model

    model = load_model(run).model
    n_layers = sum(1 for n, _ in model.named_parameters() if n.endswith(".experts.down_proj"))
    expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"config": model.cfg.to_dict(), "params": model.num_params(), "expert_bytes": expert,
            "non_expert_bytes": total - expert, "one_expert_bytes": expert // (n_layers * model.cfg.moe.num_experts),
            "run": str(run)}


def quantize_run(run: Path, out: Path, args) -> dict:
    """`run` quantised to ``args.quant`` into `out`; `describe`'s figures for it (bytes as
    resident: int4 experts in the kernel's copy, which has the stored form's size)."""
    from moelab.moe import MoE
    from moelab.offload import expert_layouts
    from moelab.quant import QuantFormat, load_quantized, quantize_model, save_quantized
    from moelab.quant.linear import QuantizedLinear
    from moelab.rundir import load_model

    loaded = load_model(run)
    params = loaded.model.num_params()  # (a quantised model's codes are buffers, not parameters)
    fmt = QuantFormat(name=args.quant, group_size=args.group_size)
    quantize_model(loaded.model, fmt, what=args.what)
    save_quantized(loaded.model, out, fmt=fmt, tokenizer_path=loaded.tokenizer_path)
    model = load_quantized(out).model
    layouts = expert_layouts(model, fmt)
    one = layouts[0].slot_bytes()
    experts = one * sum(lay.num_experts for lay in layouts)
    moes = {id(m.experts) for m in model.modules() if isinstance(m, MoE)}
    non_expert = sum(t.numel() * t.element_size() for mod in model.modules() if id(mod) not in moes
                     for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]) + sum(
        m.kernel_only_nbytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    return {"config": model.cfg.to_dict(), "params": params, "expert_bytes": experts,
            "non_expert_bytes": non_expert, "one_expert_bytes": one, "run": str(out),
            "quant": {"format": args.quant, "group_size": args.group_size if args.quant == "int4" else None,
                      "what": args.what, "source": str(run)}}


def run_child(run: Path, budget: str, policy: str, args, page_cache: str = "keep", prefetch: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", "--run", str(run), "--budget", budget,
           "--policy", policy, "--page-cache", page_cache, "--threads", str(args.threads),
           *(["--prefetch-child"] if prefetch else []),
           "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("runs/bench/memory.json"))
    ap.add_argument("--quick", action="store_true", help="a smaller model, fewer tokens (a smoke test)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-expert", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all cases (best kept)")
    ap.add_argument("--policies", default="lru,lfu")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="lru", help=argparse.SUPPRESS)
    ap.add_argument("--page-cache", default="keep", help=argparse.SUPPRESS)
    ap.add_argument("--prefetch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true",
                    help="also each budget with a cold page cache (LRU): every expert read comes from the disk")
    ap.add_argument("--prefetch", action="store_true",
                    help="also each budget with LRU and next-layer prefetch (and cold with prefetch, with --cold)")
    ap.add_argument("--model-run", type=Path, default=None,
                    help="measure this float moelab run (e.g. a trained one, whose next-layer guesses mean something) "
                    "instead of building a random model")
    ap.add_argument("--fractions", default=None, help="expert budgets as fractions of the expert bytes "
                    "(default 1,0.5,0.25,0.125)")
    ap.add_argument("--quant", choices=("int8", "int4"), default=None,
                    help="measure a quantised copy of the run (its experts offloaded quantised)")
    ap.add_argument("--what", choices=("experts", "all"), default="experts", help="with --quant: what it quantises")
    ap.add_argument("--group-size", type=int, default=128, help="with --quant int4")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.d_model, args.d_expert, args.layers, args.new_tokens, args.repeats = 256, 512, 4, 12, 1
    from benchmarks.common import machine_info
    from moelab.io import atomic_write_json

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_run:
            run = args.model_run
            model = describe(run)
        else:
            run = Path(tmp) / "run"
            model = build(args, run)
        if args.quant:
            model = quantize_run(run, Path(tmp) / f"run-{args.quant}", args)
            run = Path(model["run"])
        log.info("model: %.0fM params, experts %.0f MiB, non-expert %.0f MiB", model["params"] / 1e6,
                 model["expert_bytes"] / 2**20, model["non_expert_bytes"] / 2**20)
        fractions = tuple(float(x) for x in args.fractions.split(",")) if args.fractions else FRACTIONS
        cases = [(None, "resident", "-")] + [(f, str(int(f * model["expert_bytes"])), p)
                                             for f in fractions for p in args.policies.split(",")]
        if args.prefetch:
            cases += [(f, str(int(f * model["expert_bytes"])), "lru+prefetch") for f in fractions]
        if args.cold:
            cases += [(f, str(int(f * model["expert_bytes"])), "lru-cold") for f in fractions]
            if args.prefetch:
                cases += [(f, str(int(f * model["expert_bytes"])), "lru-cold+prefetch") for f in fractions]
        # Rounds over all cases, interleaved: other jobs on a shared machine then slow every
        # case alike rather than one; the best round per case is the least disturbed one.
        runs: dict[tuple, list[dict]] = {(f, p): [] for f, _, p in cases}
        for i in range(args.rounds):
            for frac, budget, policy in cases:
                base, _, extra = policy.partition("+")
                cold = base.endswith("-cold")
                r = run_child(run, budget, base.removesuffix("-cold") if policy != "-" else "lru", args,
                              page_cache="drop" if cold else "keep", prefetch=extra == "prefetch")
                log.info("round %d %s %s: %.1f tok/s", i, frac, policy, r["decode_tok_s"])
                runs[(frac, policy)].append(r)
        rows = []
        for (frac, policy), rs in runs.items():
            r = max(rs, key=lambda x: x["decode_tok_s"])
            r.update(fraction=frac, policy=None if policy == "-" else policy,
                     decode_tok_s_rounds=[x["decode_tok_s"] for x in rs], vmhwm=max(x["vmhwm"] for x in rs))
            rows.append(r)
        resident = rows[0]
        for r in rows:
            s = r["stats"] or {}
            held = model["expert_bytes"] if r["fraction"] is None else s["peak_resident_bytes"]
            r["same_tokens_as_resident"] = r["token_ids"] == resident["token_ids"]
            r["expected_bytes"] = r["rss_before_load"] + model["non_expert_bytes"] + held
            r["slack_bytes"] = r["vmhwm"] - r["expected_bytes"]
            r["speed_vs_resident"] = r["decode_tok_s"] / resident["decode_tok_s"]
            log.info("%-9s %-17s %7.1f tok/s (%.2fx)  VmHWM %6.0f MiB  expected %6.0f MiB  slack %+5.0f MiB  hit %s"
                     "  stall %s  prefetched %s used %s",
                     "resident" if r["fraction"] is None else f"{r['fraction']:.1%}", r["policy"] or "-",
                     r["decode_tok_s"], r["speed_vs_resident"], r["vmhwm"] / 2**20, r["expected_bytes"] / 2**20,
                     r["slack_bytes"] / 2**20, f"{s['hit_rate']:.1%}" if s else "-",
                     f"{s['stall_s']:.2f}s" if s else "-", s.get("prefetched", "-"), s.get("prefetch_used", "-"))
    atomic_write_json(args.json, {"machine": machine_info(), "model": model, "args": vars(args) | {"json": str(args.json), "model_run": str(args.model_run) if args.model_run else None},
                                  "rows": rows})
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
