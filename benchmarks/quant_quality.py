"""Benchmark: what quantising the experts costs in quality, fp32 / bf16 / int8 / int4.

    python -m benchmarks.quant_quality --run RUN_DIR [--json OUT] [--tokens N] [--gen 256]

For a trained moelab run (its own tokenizer and the default corpus's validation split,
prepared as `moelab analyze` does), each format is made from the same fp32 weights with
`moelab.quant.quantize_model` (routed experts only, everything else fp32; and the
``-all`` rows: `--what all`) and measured side by side in one process:

  - validation LM loss, overall (token-weighted) and per domain (`moelab.train.trainer.evaluate`);
  - greedy agreement with fp32: the fp32 model writes ``--gen`` tokens greedily from a few
    validation prompts; each format is teacher-forced on that same text and scored on
    whether its own argmax equals fp32's at every position (so one early divergence does
    not decide the rest), plus the length of the identical prefix of its own free-running
    greedy output;
  - the file size of the saved run (`moelab.quant.save_quantized`; fp32: the run's own).

``--random-hf`` adds the decode benchmark's ~200M random Mixtral (no corpus: greedy
agreement and file size only; its val loss means nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine_info, set_threads
from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.quant_quality")
# "-all": `--what all` (attention, dense FFNs, shared experts and the LM head too; the
# routers and a tied head stay float), the setting of the decode targets.
# "-head8": the LM head in int8 beside the int4 linears (`moelab quantize --head-format int8`).
FORMATS = ("fp32", "bf16", "int8", "int4", "int8-all", "int4-all", "int4-all-head8")


def _fmt(fmt: str):
    from moelab.quant import QuantFormat

    name = fmt.removesuffix("-head8").removesuffix("-all")
    return QuantFormat(name="int4", group_size=128) if name == "int4" else name


def variant(model, fmt: str):
    from moelab.quant import quantize_model

    m = copy.deepcopy(model)
    if fmt == "fp32":
        return m
    quantize_model(m, _fmt(fmt), what="all" if "-all" in fmt else "experts",
                   head="int8" if fmt.endswith("-head8") else None)
    return m.eval()


def file_bytes(model, fmt: str, run_dir: Path | None) -> int:
    from moelab.quant import save_quantized
    from moelab.rundir import save_model

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        if fmt == "fp32":
            save_model(model, out)
        else:
            save_quantized(model, out, fmt=_fmt(fmt), source={"benchmark": str(run_dir or "random")})
        return (out / "model.safetensors").stat().st_size


@torch.inference_mode()
def agreement(ref_ids: list[list[int]], prompts: list[list[int]], model) -> tuple[float, float]:
    """(teacher-forced top-1 agreement with the fp32 continuation, mean identical prefix of
    the free-running greedy continuation / its length)."""
    from moelab.infer.generate import generate

    same = total = 0
    prefix = []
    for p, ref in zip(prompts, ref_ids, strict=True):
        seq = torch.tensor([p + ref])
        logits = model(seq, telemetry=False).logits[0, len(p) - 1 : -1]
        pred = logits.argmax(-1).tolist()
        same += sum(int(a == b) for a, b in zip(pred, ref, strict=True))
        total += len(ref)
        own = generate(model, [p], max_new_tokens=len(ref)).token_ids[0]
        k = next((i for i, (a, b) in enumerate(zip(own, ref, strict=True)) if a != b), len(ref))
        prefix.append(k / len(ref))
    return same / total, sum(prefix) / len(prefix)


def measure(model, *, prompts, gen: int, val=None, run_dir: Path | None = None,
            formats: tuple[str, ...] = FORMATS) -> list[dict]:
    from moelab.infer.generate import generate
    from moelab.train.trainer import evaluate

    ref = [generate(model, [p], max_new_tokens=gen).token_ids[0] for p in prompts]
    rows = []
    for fmt in formats:
        m = variant(model, fmt)
        row: dict = {"format": fmt, "file_bytes": file_bytes(m, fmt, run_dir)}
        if val is not None:
            with torch.no_grad():
                row["val_loss"], row["val_loss_by_domain"] = evaluate(m, val, torch.device("cpu"), contextlib.nullcontext)
        row["greedy_agreement"], row["identical_prefix"] = agreement(ref, prompts, m)
        rows.append(row)
        log.info("%s: file %.1f MB, val %s, teacher-forced agreement %.4f, identical prefix %.2f", fmt,
                 row["file_bytes"] / 1e6, f"{row['val_loss']:.4f}" if "val_loss" in row else "-",
                 row["greedy_agreement"], row["identical_prefix"])
    fp = rows[0]["file_bytes"]
    for row in rows:
        row["file_ratio"] = row["file_bytes"] / fp
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a trained moelab run dir (float)")
    p.add_argument("--json", default="runs/bench/quant_quality.json")
    p.add_argument("--tokens", type=int, default=8192, help="validation tokens per domain")
    p.add_argument("--gen", type=int, default=256, help="greedy tokens per prompt")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--random-hf", action="store_true", help="also the ~200M random Mixtral (no val loss)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, fp32 first (the file-size base)")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    formats = tuple(args.formats.split(","))
    if unknown := [f for f in formats if f not in FORMATS]:
        p.error(f"--formats: {unknown[0]!r} is not a format; allowed: {', '.join(FORMATS)}")
    if formats[0] != "fp32":
        p.error("--formats must start with fp32 (file sizes are given as a ratio to it)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    result: dict = {"machine": machine_info(), "threads": threads, "args": vars(args)}
    if args.run:
        from moelab.data.batching import val_batches
        from moelab.data.loader import prepare_data
        from moelab.data.tokenizer import load_tokenizer
        from moelab.lab.specialization.analysis import held_out_tokens
        from moelab.rundir import load_model

        loaded = load_model(args.run)
        data = prepare_data(None)
        tok = load_tokenizer(loaded.tokenizer_path) if loaded.tokenizer_path else None
        held = held_out_tokens(data, tok, args.tokens)
        val = val_batches(held, 8, min(256, loaded.config.max_seq_len), max_batches_per_domain=None)
        prompts = [held[d][:32].tolist() for d in list(held)[: args.prompts]]
        log.info("run %s: %.1fM parameters, domains %s", args.run, loaded.model.num_params() / 1e6, list(held))
        result["run"] = {"path": args.run, "params": loaded.model.num_params(),
                         "rows": measure(loaded.model, prompts=prompts, gen=args.gen, val=val, run_dir=Path(args.run),
                                         formats=formats)}
    if args.random_hf:
        from transformers import AutoModelForCausalLM, MixtralConfig

        from moelab.hf import from_pretrained

        cfg = MixtralConfig(vocab_size=32000, hidden_size=768, intermediate_size=1024, num_hidden_layers=8,
                            num_attention_heads=12, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
            ours = from_pretrained(d)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 32000, (args.prompts, 32), generator=g).tolist()
        result["random_hf"] = {"params": ours.num_params(), "rows": measure(ours, prompts=prompts, gen=args.gen,
                                                                             formats=formats)}
    if "run" not in result and "random_hf" not in result:
        p.error("give --run RUN_DIR and/or --random-hf")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
