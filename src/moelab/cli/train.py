"""`moelab train`: train a preset (or a saved config) on the default corpus or user data.

Thin layer over `moelab.data.prepare_data` and `moelab.train.train`. The helpers here
(training options, model resolution) are shared with `moelab compare`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

from moelab.cli import _parallel
from moelab.cli.options import precision_type
from moelab.data import DataConfig, PreparedData, prepare_data, prepare_data_from_config
from moelab.errors import ConfigError, DataError
from moelab.model import ModelConfig, get_preset
from moelab.rundir import is_run_dir, model_config_from_run, model_config_of, read_run_config
from moelab.train import TrainConfig, TrainingInterrupted, train

logger = logging.getLogger(__name__)

# CLI flag -> TrainConfig field, for the options that map one to one.
TRAIN_FLAGS = {
    "steps": int,
    "batch_size": int,
    "seq_len": int,
    "lr": float,
    "min_lr_ratio": float,
    "warmup_steps": int,
    "weight_decay": float,
    "grad_clip": float,
    "seed": int,
    "eval_interval": int,
    "eval_batches": int,
    "log_interval": int,
    "checkpoint_interval": int,
}


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `compare` (defaults None: unset keeps the config's value)."""
    g = p.add_argument_group("training")
    for name, typ in TRAIN_FLAGS.items():
        default = getattr(TrainConfig(), name)
        g.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, metavar="N" if typ is int else "X",
                       help=f"(default {default})")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="(default auto)")
    g.add_argument("--precision", type=precision_type, default=None,
                   help="(default auto: bf16 autocast on CUDA and on CPUs with native bf16, AMX/AVX512-BF16; fp32 elsewhere)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the CPUs available to this process, from its affinity "
                   "mask and cgroup CPU quota)")
    g.add_argument("--aux-loss-coef", type=float, default=None, metavar="X",
                   help="MoE load-balancing loss coefficient (default: the model config's)")
    g.add_argument("--z-loss-coef", type=float, default=None, metavar="X",
                   help="MoE router z-loss coefficient (default: the model config's)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files, folders or .jsonl files (default: the built-in multi-domain corpus)")
    d.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-data cache (default runs/cache/data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="write metrics.jsonl only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def train_config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    changes = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    if args.device is not None:
        changes["device"] = args.device
    if args.precision is not None:
        changes["precision"] = args.precision
    if args.compile:
        changes["compile"] = True
    if args.threads is not None:
        changes["num_threads"] = args.threads
    return dataclasses.replace(base or TrainConfig(), **changes)


def resolve_model(name_or_path: str) -> ModelConfig:
    """A preset name, a JSON file with a `ModelConfig.to_dict()`, or a run's config.json / run dir."""
    if is_run_dir(name_or_path):
        return model_config_from_run(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"model config file {path} does not exist")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"model config file {path} is not valid JSON: {e}") from None
        body = raw.get("model", raw) if isinstance(raw, dict) else raw
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: expected a JSON object with the ModelConfig fields")
        return ModelConfig.from_dict(body)
    return get_preset(name_or_path)


def with_loss_coefs(cfg: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    changes = {}
    if args.aux_loss_coef is not None:
        changes["aux_loss_coef"] = args.aux_loss_coef
    if args.z_loss_coef is not None:
        changes["z_loss_coef"] = args.z_loss_coef
    if not changes:
        return cfg
    if cfg.moe is None:
        logger.info("--aux-loss-coef/--z-loss-coef ignored for a dense model")
        return cfg
    return cfg.with_(moe=dataclasses.replace(cfg.moe, **changes))


def load_data(args: argparse.Namespace, vocab_size: int, *, seed: int = 0, tokenizer: Path | None = None) -> PreparedData:
    """Prepared data for `--data` (or the default corpus) with the model's vocabulary size
    (or encoded with `tokenizer`, a fine-tuned model's own)."""
    if args.data:
        for p in args.data:
            if not Path(p).exists():
                raise DataError(f"--data path {p} does not exist (expected a text file, a folder or a .jsonl file)")
    return prepare_data(args.cache_dir, data_paths=args.data, vocab_size=vocab_size, seed=seed, tokenizer=tokenizer)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (a preset or a config) and write a run directory",
        description="Train a Mixtral-style MoE or dense model. Writes OUT/config.json, model.safetensors, "
        "trainer_state.json, metrics.jsonl and tb/. --resume continues an interrupted run exactly. "
        "See docs/train.md.",
    )
    p.add_argument("--model", default=None, metavar="PRESET_OR_JSON",
                   help="preset name (e.g. tiny-moe, tiny-dense) or a JSON model config (default tiny-moe)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<model>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--init-from", default=None, metavar="RUN_OR_HF_DIR",
                   help="fine-tune: start from this checkpoint's weights (a moelab run or a Hugging Face folder "
                   "moelab imports), its architecture and its tokenizer (the data is encoded with it)")
    _parallel.add_arguments(p)
    add_training_arguments(p)
    p.set_defaults(func=run)


def resume_command(out: Path, args: argparse.Namespace) -> str:
    """The command that continues the run in `out` exactly: settings, steps and the data
    recipe come from its config.json; only the prepared-data cache folder is not recorded."""
    parts = ["moelab", "train", "--resume", "--out", str(out)]
    if args.cache_dir:
        parts += ["--cache-dir", args.cache_dir]
    return " ".join(shlex.quote(p) for p in parts)


def _init_from(args: argparse.Namespace):
    """(model config, model with the source's weights, source entry) for ``--init-from``."""
    from moelab.hf import load_any

    if args.model:
        raise ConfigError("--model and --init-from: the architecture comes from --init-from; drop --model")
    if args.resume:
        raise ConfigError("--init-from starts a new run; --resume continues one (its weights come from --out)")
    loaded = load_any(args.init_from)
    if loaded.kind.startswith("moelab-"):
        raise ConfigError(
            f"--init-from {args.init_from}: a quantised checkpoint ({loaded.kind}) cannot be fine-tuned (its experts "
            "hold packed integers, which take no gradient); fine-tune the float checkpoint it was made from"
        )
    if loaded.tokenizer_path is None:
        raise ConfigError(
            f"--init-from {args.init_from}: no tokenizer.json beside the weights; fine-tuning must encode the data "
            "with the model's own tokenizer (put it in the folder)"
        )
    model_cfg = with_loss_coefs(loaded.config, args)
    import torch

    from moelab.model import Transformer

    with torch.device("meta"):  # the config may differ in loss coefficients only: same tensors
        model = Transformer(model_cfg)
    model.load_state_dict(loaded.model.state_dict(), strict=True, assign=True)
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    source = {"init_from": str(Path(args.init_from).resolve()), "kind": loaded.kind}
    return model_cfg, model, loaded.tokenizer_path, source


def _say_from_scratch(name: str) -> None:
    """`--model DIR` takes the architecture only: say so when DIR holds weights too."""
    folder = Path(name)
    if folder.is_file():
        folder = folder.parent
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        logger.info("--model %s: using its architecture only, training from random weights "
                    "(to fine-tune its weights, pass --init-from %s)", name, name)


def _configs_and_data(args: argparse.Namespace):
    """(model config, train config, data, pre-built model or None, source entry or None)."""
    model = source = None
    if args.init_from:
        model_cfg, model, tokenizer, source = _init_from(args)
        train_cfg = train_config_from_args(args)
        data = load_data(args, model_cfg.vocab_size, tokenizer=tokenizer)
    elif args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR, the run directory to continue")
        saved = read_run_config(args.out)
        model_config_of(saved, args.out)  # a broken model entry: the one error every reader gives
        if not isinstance(saved.get("train"), dict):
            raise ConfigError(
                f"--resume: {args.out} was not written by `moelab train` (a converted or quantised checkpoint has "
                f"no training state); fine-tune it into a new folder with --init-from {args.out} --out NEW_DIR"
            )
        model_cfg = resolve_model(args.model) if args.model else model_config_of(saved, args.out)
        train_cfg = train_config_from_args(args, TrainConfig.from_dict(saved["train"]))
        saved_data = (saved.get("data") or {}).get("config")
        if args.data or not saved_data:
            data = load_data(args, model_cfg.vocab_size)
        else:
            data = prepare_data_from_config(DataConfig(**saved_data), args.cache_dir)
    else:
        model_cfg = resolve_model(args.model or "tiny-moe")
        if args.model:
            _say_from_scratch(args.model)
        train_cfg = train_config_from_args(args)
        data = load_data(args, model_cfg.vocab_size)
    if not args.init_from:
        model_cfg = with_loss_coefs(model_cfg, args)
    return model_cfg, train_cfg, data, model, source


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return _parallel.relaunch(args)
    ctx = _parallel.init(args)
    if ctx is not None and not ctx.is_main:
        import torch.distributed as dist

        dist.barrier()  # the main rank prepares (and caches) the data first
    model_cfg, train_cfg, data, model, source = _configs_and_data(args)
    if ctx is not None and ctx.is_main:
        import torch.distributed as dist

        dist.barrier()
    parallel = None
    if ctx is not None:
        from moelab.dist.train import ExpertParallel

        parallel = ExpertParallel(ctx, train_cfg)
    name = args.model or (Path(args.init_from).resolve().name + "-ft" if args.init_from else "tiny-moe")
    out = Path(args.out) if args.out else Path("runs") / Path(name).stem
    try:
        result = train(model_cfg, train_cfg, data, out, resume=args.resume, progress=not args.no_progress,
                       tensorboard=not args.no_tensorboard, overwrite=args.overwrite, model=model, source=source,
                       parallel=parallel)
    except TrainingInterrupted as e:
        print(f"moelab train: interrupted at step {e.step} of {train_cfg.steps}; checkpoint written in {out}\n"
              f"resume with: {resume_command(out, args)}", file=sys.stderr)
        return 130
    if parallel is not None and not parallel.is_main:
        return 1 if result.stopped_reason else 0
    if args.json:
        d = dataclasses.asdict(result)
        d["out_dir"] = str(result.out_dir)
        print(json.dumps(d, indent=2))
    elif result.already_done:
        print(f"run: {result.out_dir} is already at step {result.steps_done} (--steps {train_cfg.steps}): "
              "nothing to do, nothing written")
        if result.val_loss is not None:
            print(f"val loss {result.val_loss:.4f} (from its last evaluation)")
    else:
        print(f"run: {result.out_dir}  steps: {result.steps_done}  params: {result.num_params / 1e6:.2f}M")
        if result.val_loss is not None:
            by_domain = "  ".join(f"{d} {v:.4f}" for d, v in result.val_loss_by_domain.items())
            print(f"val loss {result.val_loss:.4f}  ({by_domain})")
        load = "" if result.load_avg is None else f", load average {result.load_avg:.1f}"
        print(f"{result.tokens_per_s:.0f} tokens/s, {result.step_time_s:.3f} s/step (median; "
              f"{result.threads} threads{load})")
        load = [(r["step"], r["busiest_expert_share"]) for r in result.history if "busiest_expert_share" in r]
        if len(load) >= 2:
            uniform = 1 / model_cfg.moe.num_experts if model_cfg.moe else float("nan")
            print(f"expert load (busiest expert's share of validation assignments, uniform {uniform:.3f}): "
                  f"step {load[0][0]} {load[0][1]:.3f} -> step {load[-1][0]} {load[-1][1]:.3f}")
        if result.stopped_reason:
            print(f"stopped early: {result.stopped_reason}")
    return 1 if result.stopped_reason else 0
