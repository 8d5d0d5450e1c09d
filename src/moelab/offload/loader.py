"""`load_offloaded`: a moelab run as a model whose routed experts stay on disk.

The `Transformer` is built on the meta device (no memory, no random init); each MoE
layer's ``experts`` is swapped for an `OffloadedExperts` over one shared `ExpertStore`,
so the model's state dict no longer names the expert tensors; then the non-expert
tensors are assigned from ``model.safetensors`` with `moelab.rundir.assign_weights`'s
checks, the expert tensors left unread (``ignore``). The expert weights are never
materialised: the resident weights are the non-expert ones plus the store's slots,
which never exceed ``expert_memory``.

Supported: float moelab run directories (or their ``model.safetensors``), CPU, and CUDA
(``device="cuda"``: the cache on the GPU, the rest in pinned CPU memory); and int8 / int4
runs of `moelab quantize` (``--what experts`` or ``all``), CPU only: the store then holds
the quantised experts (`ExpertStore`, "Quantised experts"), the other quantised linears
are loaded as `moelab.quant.load_quantized` loads them, and the model computes what the
resident quantised model computes (tests/offload). Refused with a `CheckpointError`
naming the file: bf16 runs of `moelab quantize` (offload the float run), Hugging Face
folders (convert them first: ``moelab convert HF_DIR --to-moelab OUT``), anything else
that is not a moelab run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoE
from moelab.offload.experts import OffloadedExperts
from moelab.offload.store import ExpertLayout, ExpertStore, OffloadStats
from moelab.quant import QuantFormat
from moelab.quant.checkpoint import empty_quantized_linears, read_head, read_quant_entry
from moelab.quant.experts import kernel_runs
from moelab.quant.linear import QuantizedLinear
from moelab.rundir import (
    QUANT_METADATA_KEY,
    assign_weights,
    config_path,
    existing_run_paths,
    is_run_dir,
    model_config_of,
    quant_of,
    read_run_config,
    tokenizer_of,
)


@dataclass(frozen=True)
class OffloadedModel:
    """What `load_offloaded` returns: the fields of `moelab.rundir.LoadedModel` and the store."""

    model: Transformer  # in eval mode; its MoE layers hold `OffloadedExperts`
    config: ModelConfig
    tokenizer_path: Path | None
    run_dir: Path
    store: ExpertStore
    kind: str = "moelab-offload"  # a quantised run's: "moelab-offload-int8" / "moelab-offload-int4"

    def stats(self) -> OffloadStats:
        return self.store.stats()

    def non_expert_bytes(self) -> int:
        """Bytes of the resident (non-expert) weights, a tied tensor counted once (and the
        int4 linears' kernel copies, which are not buffers)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
            b.numel() * b.element_size() for b in self.model.buffers()) + sum(
            m.kernel_only_nbytes() for m in self.model.modules() if isinstance(m, QuantizedLinear))


def expert_layouts(model: Transformer, fmt: QuantFormat | None = None) -> list[ExpertLayout]:
    """One `ExpertLayout` per MoE layer of `model`, in layer order (`fmt`: the experts'
    stored format, for a quantised run)."""
    layouts = []
    quant = {} if fmt is None else {"quant": fmt.name, "group_size": fmt.group_size if fmt.name == "int4" else 0,
                                    "kernel_form": kernel_runs(fmt.name)}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            c = m.cfg
            layouts.append(ExpertLayout(prefix=f"{name}.experts", num_experts=c.num_experts, d_model=c.d_model,
                                        d_expert=c.d_expert, activation=c.activation, **quant))
    return layouts


def _check_source(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_run_dir(path):
        return
    if path.is_dir() and (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: not a moelab run (a Hugging Face folder?); offloading "
                              f"reads moelab run directories only: convert it first with "
                              f"`moelab convert {path} --to-moelab OUT`")
    raise CheckpointError(f"{path}: not a moelab run directory or its model.safetensors (no config.json "
                          "with \"format\": \"moelab-run\" beside it)")


def load_offloaded(
    path: str | Path,
    *,
    expert_memory: int,
    policy: str = "lru",
    scope: str = "layer",
    page_cache: str = "keep",
    prefetch: bool = False,
    device: str = "cpu",
) -> OffloadedModel:
    """A float moelab run (dir or ``model.safetensors``) with its routed experts offloaded:
    at most `expert_memory` bytes of them resident (module docstring; `ExpertStore` for
    ``policy`` "lru" / "lfu", ``scope`` "layer" / "global" and ``page_cache`` "keep" / "drop").
    ``prefetch=True``: each MoE layer prefetches the next one's likely experts on a
    background thread (`ExpertStore`, "Prefetch"; docs/offload.md has what it measured).
    ``device="cuda"``: the non-expert weights and the expert cache on the GPU, every expert
    read once into pinned CPU memory (`ExpertStore`, "On a GPU")."""
    p = Path(path)
    _check_source(p)
    run_dir, weights = existing_run_paths(p)
    run_cfg = read_run_config(run_dir)
    quant = quant_of(run_cfg)
    fmt = head = None
    if quant is not None:
        cfg_path = config_path(run_dir)
        fmt = read_quant_entry(quant, cfg_path)
        if not isinstance(fmt, QuantFormat):
            raise CheckpointError(f"{cfg_path}: a {fmt} run (\"quant\": format {fmt!r}); offloading reads float, "
                                  "int8 and int4 runs (offload the float run, or run this one resident)")
        head = read_head(quant, fmt, cfg_path)
        if torch.device(device).type != "cpu":
            raise ConfigError(f"offload device={device!r} with the {fmt.name} run {run_dir}: quantised experts run on "
                              "torch's CPU kernels only; use device='cpu', or offload the float run")
    cfg = model_config_of(run_cfg, run_dir)
    exact: frozenset[str] = frozenset()
    with torch.device("meta"):
        model = Transformer(cfg)
        if quant is not None and quant.get("what") == "all":
            exact = empty_quantized_linears(model, fmt, quant["moelab_quant_version"], head)
    layouts = expert_layouts(model, fmt)
    if not layouts:
        raise ConfigError(f"{run_dir}: the model has no MoE layers; there are no experts to offload")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    store = ExpertStore(weights, layouts, expert_memory=expert_memory, policy=policy, scope=scope,
                        dtype=moes[0].experts.down_proj.dtype, page_cache=page_cache, prefetch=prefetch,
                        device=device)
    ignore = set()
    for j, (moe, layout) in enumerate(zip(moes, layouts, strict=True)):
        moe.experts = OffloadedExperts(store, j, impl=moe.cfg.impl)
        ignore.update((layout.in_name, layout.out_name) if fmt is None else (n for n, _, _ in layout.file_parts()))
    if prefetch:
        for j in range(len(moes) - 1):
            moes[j].experts.next_router = (moes[j + 1].router, j + 1)
    try:
        metadata = assign_weights(model, weights, ignore=frozenset(ignore), exact_dtype=exact)
        if fmt is not None and metadata.get(QUANT_METADATA_KEY) != fmt.name:
            raise CheckpointError(f"{weights}: its metadata says {QUANT_METADATA_KEY}="
                                  f"{metadata.get(QUANT_METADATA_KEY)!r} but {config_path(run_dir)} says "
                                  f"\"quant\".format={fmt.name!r}; the file does not match its config")
        model.to(store.device)  # the non-expert weights (the offloaded experts hold none)
        for m in model.modules():
            if isinstance(m, QuantizedLinear) and m.fmt.name == "int4" and kernel_runs("int4"):
                m.kernel_weights()  # packed now rather than on the first token, as load_quantized does
    except BaseException:
        store.close()
        raise
    return OffloadedModel(model=model.eval(), config=cfg, tokenizer_path=tokenizer_of(run_dir), run_dir=run_dir,
                          store=store, kind="moelab-offload" + (f"-{fmt.name}" if fmt is not None else ""))
