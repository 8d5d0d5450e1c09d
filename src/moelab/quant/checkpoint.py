"""Quantised checkpoints on disk: `save_quantized` writes one, `load_quantized` reads it back.

A quantised checkpoint is an ordinary run directory (`moelab.rundir`):

    config.json        the run config plus a top-level entry
                       "quant": {"format": "int8" | "int4" | "bf16", "group_size": int | null,
                                 "what": "experts" | "all", "moelab_quant_version": 2,
                                 "head": "int8" (only with int4 "all"; version 3)}
    model.safetensors  non-expert weights as they are; each MoE layer's routed experts under
                       the layer's usual prefix ``layers.N.mlp.experts.``:
                         int8: <proj>_qweight int8 [E, O, I], <proj>_scale bf16 [E, O]
                         int4: <proj>_qweight uint8 [E, O, I/2] (nibbles, `formats.pack_int4`),
                               <proj>_scale, <proj>_zero bf16 [E, O, I/G]
                         bf16: <proj> bf16 (the float experts' names, cast)
                       with <proj> ``gate_up_proj`` (swiglu) or ``up_proj`` (gelu), and
                       ``down_proj``; safetensors metadata ``moelab_quant: <format>``
                       with "what": "all", also every other linear but the routers and a
                       tied LM head (`moelab.quant.linear.quantizable_linears`) under its own
                       name: int8 ``qweight`` [O, I], ``scale`` [O]; int4 ``qweight`` [O, I/2],
                       ``scale``, ``zero`` [O, N]; ``bias`` float32 when it has one
    tokenizer.json     when the source had one

``group_size`` is the int4 group (null for int8 and bf16). The int4 kernel's own packed copy
is not saved (its layout is blocked per CPU build): loading rebuilds it. Version 1 files are
read too: they differ only in int4 ``"what": "all"``, which left float the linears whose
output rows are not a multiple of 16 (version 2 quantises them, `moelab.quant.linear`); a
model loaded from one is saved as version 1 again. Version 3 files are those with a "head"
entry: the LM head in int8 beside int4 linears (`moelab.quant.linear.HEAD`); files without
one are still written as version 2, which older readers take.

`moelab.rundir.load_model` (a lower layer, which knows no quantised experts) refuses such a
run; `moelab.hf.load_any` hands it to `load_quantized`. The `LoadedModel` it returns says
the format in ``kind``: "moelab-int8", "moelab-int4" or "moelab-bf16".
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from moelab.errors import CheckpointError, ConfigError
from moelab.io import atomic_dir
from moelab.model import Transformer
from moelab.moe import MoE, RoutedExperts
from moelab.quant.experts import QuantizedExperts, kernel_runs
from moelab.quant.formats import FORMATS, QuantFormat
from moelab.quant.linear import (
    HEAD,
    HEAD_FORMAT_SINCE,
    INT4_ROWS_PADDED_SINCE,
    QuantizedLinear,
    linear_format,
    quantizable_linears,
)
from moelab.quant.quantize import BF16, WHAT, check_head, swap_linears
from moelab.rundir import (
    QUANT_KEY,
    QUANT_METADATA_KEY,
    LoadedModel,
    assign_weights,
    check_out_dir,
    config_path,
    existing_run_paths,
    model_config_of,
    quant_of,
    read_run_config,
    save_model,
    tokenizer_of,
    verify_weights,
)

log = logging.getLogger(__name__)

QUANT_VERSION = 2  # what a file without a "head" entry is written as
READ_VERSIONS = (1, 2, 3)
CHECKPOINT_FORMATS = (BF16, *FORMATS)  # what "quant"."format" may say


def quant_entry(fmt: QuantFormat | str, what: str = "experts", version: int = QUANT_VERSION,
                head: QuantFormat | None = None) -> dict:
    """The config.json "quant" entry for `fmt` (a `QuantFormat`, "int8" or "bf16")."""
    name = fmt.name if isinstance(fmt, QuantFormat) else fmt
    group = fmt.group_size if isinstance(fmt, QuantFormat) and name == "int4" else None
    entry = {"format": name, "group_size": group, "what": what, "moelab_quant_version": version}
    if head is not None:
        entry["head"] = head.name
    return entry


def _what_of(model: nn.Module, fmt: QuantFormat | str) -> tuple[str, int, QuantFormat | None]:
    """("all" when the model's other linears are quantised too, every one the rule takes,
    else "experts"; the version whose rule they follow; the LM head's own format or None).
    A model quantised only in part is refused."""
    quantized = {n: m.fmt for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not quantized:
        return "experts", QUANT_VERSION, None
    head = quantized.get(HEAD) if isinstance(fmt, QuantFormat) and quantized.get(HEAD, fmt) != fmt else None
    if head is not None:
        check_head(head, fmt, "all", "save_quantized: the LM head's format")
    wrong = [n for n, f in quantized.items() if not isinstance(fmt, QuantFormat) or f != linear_format(n, fmt, head)]
    # The float linears the rule would still take: today's, or version 1's (a model loaded
    # from a version-1 int4 file keeps its float linears and is saved as one again).
    left = quantizable_linears(model, fmt, head=head)[0] if isinstance(fmt, QuantFormat) else []
    version = QUANT_VERSION if head is None else HEAD_FORMAT_SINCE
    if (left and not wrong and head is None and fmt.name == "int4"
            and not quantizable_linears(model, fmt, pad_rows=False)[0]):
        left, version = [], INT4_ROWS_PADDED_SINCE - 1
    if wrong or left:
        raise ConfigError(f"save_quantized: the model's linears are quantised only in part or in another format "
                          f"({(wrong or left)[0]}); quantise the float model with what='all'")
    return "all", version, head


def _as_format(fmt: QuantFormat | str) -> QuantFormat | str:
    if isinstance(fmt, QuantFormat) or fmt == BF16:
        return fmt
    if fmt not in FORMATS:
        raise ConfigError(f"fmt={fmt!r} is not a format; allowed: {', '.join(CHECKPOINT_FORMATS)}")
    return QuantFormat(name=fmt)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _check_model_is(model: nn.Module, fmt: QuantFormat | str) -> None:
    """Every MoE layer's experts are of `fmt` (and there is at least one)."""
    layers = _moe_layers(model)
    if not layers:
        raise ConfigError("save_quantized: the model has no MoE layers; there are no experts to quantise")
    want = fmt.name if isinstance(fmt, QuantFormat) else fmt
    for name, moe in layers:
        ex = moe.experts
        if isinstance(ex, QuantizedExperts):
            # int8 has no groups: its QuantFormat's group_size means nothing there.
            ok = ex.fmt.name == want and (want != "int4" or ex.fmt.group_size == fmt.group_size)
            have = ex.fmt.name + (f" (group_size={ex.fmt.group_size})" if ex.fmt.name == "int4" else "")
        elif isinstance(ex, RoutedExperts):
            ok, have = fmt == BF16 and ex.w_in.dtype == torch.bfloat16, f"float experts in {ex.w_in.dtype}"
        else:
            ok, have = False, type(ex).__name__
        if not ok:
            raise ConfigError(f"save_quantized: fmt={want!r} but {name}.experts are {have}; "
                              "quantise the model to that format first (moelab.quant.quantize_model)")


def save_quantized(
    model: Transformer,
    out_dir: str | Path,
    *,
    fmt: QuantFormat | str,
    tokenizer_path: str | Path | None = None,
    source: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model`, whose experts are already quantised to `fmt` (`quantize_model`), as a
    quantised run directory (module docstring); returns it.

    The folder is assembled beside `out_dir` and renamed into place: a failure leaves no
    half-written folder, and an existing one (replaced only with ``overwrite``, and only
    when it is a moelab run) intact.
    """
    fmt = _as_format(fmt)
    _check_model_is(model, fmt)
    what, version, head = _what_of(model, fmt)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
    with atomic_dir(out) as tmp:
        save_model(model, tmp, tokenizer_path=tokenizer_path, source=source, quant=quant_entry(fmt, what, version, head))
    return out


# ---------------------------------------------------------------------------- loading


def read_quant_entry(entry: object, cfg_path: Path) -> QuantFormat | str:
    """The format a config's "quant" entry names (a `QuantFormat`, or "bf16"), checked
    field by field; a bad one raises `CheckpointError` naming the file and field."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{cfg_path}: \"quant\" must be an object, got {entry!r}")
    name = entry.get("format")
    if name not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{cfg_path}: \"quant\".format={name!r} is not a format this version reads; "
                              f"allowed: {', '.join(CHECKPOINT_FORMATS)}")
    version = entry.get("moelab_quant_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise CheckpointError(f"{cfg_path}: \"quant\".moelab_quant_version={version!r} is not supported "
                              f"(expected one of {', '.join(map(str, READ_VERSIONS))})")
    what = entry.get("what")
    if what not in WHAT:
        raise CheckpointError(f"{cfg_path}: \"quant\".what={what!r} is not supported; allowed: {', '.join(WHAT)}")
    if what == "all" and name == BF16:
        raise CheckpointError(f"{cfg_path}: \"quant\".what='all' with format bf16 is not a quantised run "
                              "(a whole-model bf16 run has no \"quant\" entry)")
    group = entry.get("group_size")
    if name != "int4":
        if group is not None:
            raise CheckpointError(f"{cfg_path}: \"quant\".group_size={group!r}, but only int4 has groups "
                                  f"(expected null for {name})")
        return name if name == BF16 else QuantFormat(name=name)
    try:
        return QuantFormat(name=name, group_size=group)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: \"quant\".group_size: {e}") from None


def _swap_experts(model: Transformer, fmt: QuantFormat | str, cfg_path: Path) -> frozenset[str]:
    """On the meta device: each MoE layer's experts as `fmt` holds them (empty
    `QuantizedExperts`, or the float experts cast to bf16). Returns the state-dict names
    whose stored dtype must be exactly the model's."""
    exact: set[str] = set()
    layers = _moe_layers(model)
    if not layers:
        raise CheckpointError(f"{cfg_path}: a quantised run whose model has no MoE layers")
    for name, moe in layers:
        old = moe.experts
        if fmt == BF16:
            old.to(torch.bfloat16)
            new: nn.Module = old
        else:
            try:
                new = QuantizedExperts(old.d_model, old.d_expert, old.num_experts, old.activation, fmt, old.impl)
            except ConfigError as e:
                raise CheckpointError(f"{cfg_path}: \"quant\".group_size: {e}") from None
            moe.experts = new
        exact.update(f"{name}.experts.{k}" for k in new.state_dict())
    return frozenset(exact)


def read_head(entry: dict, fmt: QuantFormat | str, cfg_path: Path) -> QuantFormat | None:
    """The LM head's own format a checked "quant" entry names (its "head"), or None."""
    if "head" not in entry:
        return None
    version = entry["moelab_quant_version"]
    if version < HEAD_FORMAT_SINCE:
        raise CheckpointError(f"{cfg_path}: \"quant\".head is in a version-{version} entry; it needs "
                              f"\"moelab_quant_version\": {HEAD_FORMAT_SINCE}")
    try:
        return check_head(entry["head"], fmt, entry["what"], "\"quant\".head")
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def empty_quantized_linears(model: Transformer, fmt: QuantFormat, version: int,
                            head: QuantFormat | None) -> frozenset[str]:
    """On the meta device: the linears ``what="all"`` quantises as empty `QuantizedLinear`s
    (the same rule as `quantize_model`, or version 1's); their state-dict names, whose
    dtypes are exact."""
    take, _ = quantizable_linears(model, fmt, pad_rows=version >= INT4_ROWS_PADDED_SINCE, head=head)
    for name in take:
        f = linear_format(name, fmt, head)
        swap_linears(model, [name], lambda lin, f=f: QuantizedLinear(lin.in_features, lin.out_features,
                                                                     lin.bias is not None, f))
    return frozenset(f"{n}.{k}" for n in take for k in model.get_submodule(n).state_dict())


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """A quantised run directory (or its ``model.safetensors``) as a model in eval mode.

    The `Transformer` is built on the meta device from the config's "model", each MoE
    layer's experts swapped for empty `QuantizedExperts` of the config's "quant" format
    (bf16: cast), then every tensor is assigned from the file with `moelab.rundir`'s
    checks (a missing, unexpected, mis-shaped or mis-typed tensor, a truncated file:
    `CheckpointError` naming the file and tensor). int4's kernel copy is rebuilt. The
    result's ``kind`` is ``"moelab-<format>"``. The file is checked against its recorded
    sha256 first (`moelab.rundir.verify_weights`) unless ``verify=False``.
    """
    run_dir, weights = existing_run_paths(path)
    run_cfg = read_run_config(run_dir)
    cfg_path = config_path(run_dir)
    entry = quant_of(run_cfg)
    if entry is None:
        raise CheckpointError(f"{cfg_path}: not a quantised run (no \"{QUANT_KEY}\" entry); "
                              "load it with moelab.rundir.load_model or moelab.hf.load_any")
    fmt = read_quant_entry(entry, cfg_path)
    head = read_head(entry, fmt, cfg_path)
    name = fmt.name if isinstance(fmt, QuantFormat) else fmt
    cfg = model_config_of(run_cfg, run_dir)
    if verify:
        verify_weights(run_dir, weights, run_cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
        exact = _swap_experts(model, fmt, cfg_path)
        if entry.get("what") == "all":
            exact |= empty_quantized_linears(model, fmt, entry["moelab_quant_version"], head)
    metadata = assign_weights(model, weights, device=device, exact_dtype=exact)
    tag = metadata.get(QUANT_METADATA_KEY)
    if tag != name:
        raise CheckpointError(f"{weights}: its metadata says {QUANT_METADATA_KEY}={tag!r} but {cfg_path} says "
                              f"\"quant\".format={name!r}; the file does not match its config")
    if name == "int4" and torch.device(device).type == "cpu" and kernel_runs("int4"):
        for _, moe in _moe_layers(model):
            for proj in ("in", "out"):
                moe.experts.int4_kernel_weights(proj)  # packed now rather than on the first token
        for m in model.modules():
            if isinstance(m, QuantizedLinear) and m.fmt.name == "int4":
                m.kernel_weights()
    return LoadedModel(model=model.eval(), config=cfg, tokenizer_path=tokenizer_of(run_dir), run_dir=run_dir,
                       kind=f"moelab-{name}")
