"""Benchmark: does a calibration-free int4 method beat round-to-nearest? HQQ and an MSE search.

    python -m benchmarks.int4_methods --run RUN_DIR [--group-sizes 32,64,128] [--json OUT]

Issue #12 asks for RTN int4 and "HQQ or another calibration-free method if it measurably
improves int4". This measures two such methods against the library's RTN
(`moelab.quant.formats.quantize_int4`) on a trained moelab run, side by side in one
process. Each method writes the same thing RTN writes (nibbles in [0, 15], bf16 scale and
zero in the kernel's ``(q - 8) * scale + zero`` form), so a method is a drop-in for the
offline step only: the runtime, the checkpoint layout and the speed are unchanged.

  - ``rtn``: min/max per group (the library's).
  - ``hqq``: Half-Quadratic Quantization (Badri & Shaji, 2023): the scale stays min/max;
    the zero point is refined by a proximal solver of ``min |w - dq(q(w))|_p`` with
    ``p = 0.7`` (the error is pushed to a sparse set of weights), alternating
    ``q = round(w / s + z)``, a generalised soft-threshold of the error, and the closed-form
    zero ``z = mean(q - (w - e) / s)`` (beta 10, x1.01 per step, 20 steps; HQQ's defaults).
    Each group keeps the zero of its lowest mean |error|.
  - ``mse``: per group, the grid of ``(lo * a, hi * b)`` ranges with a, b in 1.0 .. 0.6
    (11 x 11) that minimises the squared error (clipping outliers, as llama.cpp's
    quantisers search scales).

Per method, group size and what is quantised (routed experts; ``all``: also every other
linear; ``all-head8``: that with the LM head in int8, `quantize_model`'s ``head``):
the weights' relative L2 and L1 error, the validation-loss change against fp32 with the
standard error of the paired per-token difference, the mean KL(fp32 || int4) of the
next-token distributions over the same tokens (llama.cpp's `--kl-divergence` measure:
far less noisy than the loss change, since it compares the whole distribution), and the
teacher-forced top-1 agreement with fp32's greedy text (as `benchmarks.quant_quality`). ``--by-linear`` also gives RTN's
loss change when only one kind of linear (q/k/v/o, the LM head, ...) is int4.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, set_threads
from moelab.io import atomic_write_json
from moelab.quant import formats
from moelab.quant.formats import SCALE_DTYPE

log = logging.getLogger("benchmarks.int4_methods")

Int4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (q uint8 [..., I], scale bf16, zero bf16 [..., N])


def _groups(w_EOI: torch.Tensor, group_size: int) -> torch.Tensor:
    *lead, d_in = w_EOI.shape
    return w_EOI.detach().float().reshape(*lead, d_in // group_size, group_size)  # (..., N, G)


def _rounded(w_EONG: torch.Tensor, scale_EON: torch.Tensor, zero_EON: torch.Tensor, shape: torch.Size) -> Int4:
    """The nibbles of `w` on the grid of the bf16-rounded (scale, zero): what RTN does
    given a grid, so the kernel and `dequantize_int4` agree for every method."""
    scale, zero = scale_EON.to(SCALE_DTYPE), zero_EON.to(SCALE_DTYPE)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.where(s > 0, (w_EONG - z) / torch.where(s > 0, s, 1.0), 0.0).round_().add_(8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(shape), scale, zero


def quantize_int4_hqq(w_EOI: torch.Tensor, group_size: int, *, steps: int = 20, p: float = 0.7,
                      beta: float = 10.0, kappa: float = 1.01) -> Int4:
    """HQQ's zero-point refinement (module docstring) in the library's int4 form."""
    w = _groups(w_EOI, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    sd = torch.where(s > 0, s, 1.0)  # a constant group: any zero is exact
    # HQQ's form: w ~ (q - z) * s with q in [0, 15]; min/max gives z = -lo / s.
    z = -lo / sd
    best_err, best_z = None, z
    for _ in range(steps):
        q = (w / sd + z).round().clamp(0, 15)
        err = w - (q - z) * sd
        mean_abs = err.abs().mean(-1, keepdim=True)
        if best_err is None:
            best_err, best_z = mean_abs, z
        else:
            better = mean_abs < best_err
            best_err, best_z = torch.where(better, mean_abs, best_err), torch.where(better, z, best_z)
        # The l_p proximal step: shrink the error towards 0, more for small errors (p < 1).
        e = torch.sign(err) * F.relu(err.abs() - (err.abs() + 1e-8).pow(p - 1) / beta)
        z = (q - (w - e) / sd).mean(-1, keepdim=True)
        beta *= kappa
    # (q - z) * s = (q - 8) * s + (8 - z) * s: the library's zero is the middle nibble's
    # value; a constant group's (s = 0) is the constant itself.
    zero = torch.where(s > 0, (8 - best_z) * s, lo)
    return _rounded(w, s.squeeze(-1), zero.squeeze(-1), w_EOI.shape)


def quantize_int4_mse(w_EOI: torch.Tensor, group_size: int, *, grid: int = 10, floor: float = 0.6) -> Int4:
    """Per group, the clipped min/max range of least squared error (module docstring)."""
    w = _groups(w_EOI, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    best = None
    for i in range(grid + 1):
        for j in range(grid + 1):
            a, b = lo * (1 - (1 - floor) * i / grid), hi * (1 - (1 - floor) * j / grid)
            scale = ((b - a) / 15).to(SCALE_DTYPE).float()
            zero = (a + 8 * scale).to(SCALE_DTYPE).float()
            q, _, _ = _rounded(w, scale, zero, w.shape)
            sse = ((q.float() - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1) - w).pow(2).sum(-1)
            if best is None:
                best = (sse, scale, zero)
            else:
                m = sse < best[0]
                best = (torch.where(m, sse, best[0]), torch.where(m, scale, best[1]), torch.where(m, zero, best[2]))
    return _rounded(w, best[1], best[2], w_EOI.shape)


METHODS: dict[str, Callable[..., Int4]] = {
    "rtn": formats.quantize_int4,
    "hqq": quantize_int4_hqq,
    "mse": quantize_int4_mse,
}


@contextlib.contextmanager
def int4_method(name: str) -> Iterator[None]:
    """`moelab.quant` quantises int4 with `METHODS[name]` inside the block (the experts
    and the linears call ``formats.quantize_int4`` at swap time)."""
    rtn = formats.quantize_int4
    formats.quantize_int4 = METHODS[name]
    try:
        yield
    finally:
        formats.quantize_int4 = rtn


# What is quantised: the routed experts; every other linear too; and that with the LM head
# in int8 (`quantize_model(head="int8")`, llama.cpp's --output-tensor-type).
WHAT = {"experts": ("experts", None), "all": ("all", None), "all-head8": ("all", "int8")}


def weight_errors(model: torch.nn.Module, method: str, group_size: int, what: str) -> dict:
    """Relative L2 and L1 error of `method` over the weights `what` (`WHAT`) quantises."""
    from moelab.moe import MoE
    from moelab.quant import QuantFormat
    from moelab.quant.linear import HEAD, quantizable_linears

    what, head = WHAT[what]
    weights = [(p, "int4") for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()
               if p.dim() == 3]
    if what == "all":
        take, _ = quantizable_linears(model, QuantFormat(name="int4", group_size=group_size),
                                      head=head and QuantFormat(name=head))
        weights += [(model.get_submodule(n).weight, head if n == HEAD and head else "int4") for n in take]
    sq = sq_err = ab = ab_err = 0.0
    for w, fmt in weights:
        *lead, d_in = w.shape
        if fmt == "int8":
            dq = formats.dequantize_int8(*formats.quantize_int8(w))
        elif d_in % group_size:
            continue
        else:
            dq = formats.dequantize_int4(*METHODS[method](w, group_size))
        wf = w.detach().float()
        sq, sq_err = sq + wf.pow(2).sum().item(), sq_err + (dq - wf).pow(2).sum().item()
        ab, ab_err = ab + wf.abs().sum().item(), ab_err + (dq - wf).abs().sum().item()
    return {"rel_l2": math.sqrt(sq_err / sq), "rel_l1": ab_err / ab}


@torch.inference_mode()
def token_stats(model, val, ref_logp: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(next-token cross-entropy of every validation token, in a fixed order; with
    ``ref_logp``, fp32's log-probabilities per batch, also each token's KL(fp32 || model)
    stacked beneath it, else the model's own log-probabilities per batch)."""
    ce, kl, logps = [], [], []
    for i, (x, y) in enumerate(b for batches in val.values() for b in batches):
        logp = model(x, telemetry=False).logits.float().log_softmax(-1).flatten(0, 1)
        ce.append(F.nll_loss(logp, y.flatten(), reduction="none"))
        if ref_logp is None:
            logps.append(logp)
        else:
            kl.append(F.kl_div(logp, ref_logp[i], log_target=True, reduction="none").sum(-1))
    return (torch.cat(ce), logps) if ref_logp is None else (torch.stack([torch.cat(ce), torch.cat(kl)]), [])


@torch.inference_mode()
def agreement(model, seqs: list[tuple[int, list[int]]]) -> float:
    """Teacher-forced top-1 agreement with fp32's greedy continuations ``(prompt_len, ids)``."""
    same = total = 0
    for n, ids in seqs:
        pred = model(torch.tensor([ids]), telemetry=False).logits[0, n - 1 : -1].argmax(-1)
        same += int((pred == torch.tensor(ids[n:])).sum())
        total += len(ids) - n
    return same / total


def versus_fp32(stats: torch.Tensor, base: torch.Tensor) -> dict:
    """The loss change against fp32 (mean of the paired per-token differences, with its
    standard error) and the mean KL(fp32 || model) per token (with its standard error)."""
    delta, kl = stats[0] - base, stats[1]
    n = math.sqrt(delta.numel())
    return {"delta": float(delta.mean()), "se": float(delta.std() / n), "kl": float(kl.mean()),
            "kl_se": float(kl.std() / n)}


def eval_setup(run: str, tokens: int, gen: int, n_prompts: int = 4):
    """``(fp32 model, val batches, fp32 greedy continuations, fp32 per-token loss, fp32
    log-probabilities)`` of a trained run on `tokens` held-out tokens per domain of the
    default corpus, with `gen`-token continuations of `n_prompts` 32-token prompts."""
    from moelab.data.batching import val_batches
    from moelab.data.loader import prepare_data
    from moelab.data.tokenizer import load_tokenizer
    from moelab.infer.generate import generate
    from moelab.lab.specialization.analysis import held_out_tokens
    from moelab.rundir import load_model

    loaded = load_model(run)
    model = loaded.model.eval()
    tok = load_tokenizer(loaded.tokenizer_path) if loaded.tokenizer_path else None
    held = held_out_tokens(prepare_data(None), tok, tokens)
    val = val_batches(held, 8, min(256, loaded.config.max_seq_len), max_batches_per_domain=None)
    prompts = [held[d][:32].tolist() for d in list(held)[:n_prompts]]
    seqs = [(len(pr), pr + generate(model, [pr], max_new_tokens=gen).token_ids[0]) for pr in prompts]
    base, ref_logp = token_stats(model, val)
    return model, val, seqs, base, ref_logp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a trained moelab run dir (float)")
    p.add_argument("--json", default="runs/bench/int4_methods.json")
    p.add_argument("--group-sizes", default="32,64,128")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tokens", type=int, default=8192, help="validation tokens per domain")
    p.add_argument("--gen", type=int, default=256, help="fp32 greedy tokens per prompt")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--by-linear", action="store_true", help="also RTN's cost per kind of linear (group 128)")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: {unknown[0]!r} is not a method; allowed: {', '.join(METHODS)}")

    from moelab.quant import QuantFormat, quantize_model

    model, val, seqs, base, ref_logp = eval_setup(args.run, args.tokens, args.gen, args.prompts)
    log.info("run %s: %.1fM parameters, fp32 val %.5f over %d tokens", args.run, model.num_params() / 1e6,
             float(base.mean()), base.numel())
    rows = []
    for g in map(int, args.group_sizes.split(",")):
        for what, (scope, head) in WHAT.items():
            for method in methods:
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                with int4_method(method):
                    quantize_model(m, QuantFormat(name="int4", group_size=g), what=scope, head=head)
                seconds = time.perf_counter() - t0
                m.eval()
                row = {"group_size": g, "what": what, "method": method, "quantize_s": seconds,
                       **weight_errors(model, method, g, what), **versus_fp32(token_stats(m, val, ref_logp)[0], base),
                       "agreement": agreement(m, seqs)}
                rows.append(row)
                log.info("G=%d %-9s %s: rel L2 %.4f, val %+.5f +- %.5f, KL %.5f +- %.5f, agreement %.4f (%.1f s)", g,
                         what, method, row["rel_l2"], row["delta"], row["se"], row["kl"], row["kl_se"],
                         row["agreement"], seconds)
    by_linear = []
    if args.by_linear:
        from moelab.quant.linear import QuantizedLinear, quantizable_linears
        from moelab.quant.quantize import swap_linears

        fmt = QuantFormat(name="int4", group_size=128)
        take, _ = quantizable_linears(model, fmt)
        kinds: dict[str, list[str]] = {}
        for n in take:
            kinds.setdefault(n.rsplit(".", 1)[-1], []).append(n)
        for kind, names in kinds.items():
            m = copy.deepcopy(model)
            swap_linears(m, names, lambda lin: QuantizedLinear.from_linear(lin, fmt))
            by_linear.append({"kind": kind, "count": len(names),
                              **versus_fp32(token_stats(m.eval(), val, ref_logp)[0], base)})
            log.info("only %s (%d) int4: val %+.5f +- %.5f, KL %.5f", kind, len(names), by_linear[-1]["delta"],
                     by_linear[-1]["se"], by_linear[-1]["kl"])
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"machine": machine_info(), "threads": threads, "args": vars(args),
                            "run": {"path": args.run, "params": model.num_params(), "fp32_val": float(base.mean()),
                                    "tokens": base.numel()},
                            "rows": rows, "by_linear": by_linear})
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
