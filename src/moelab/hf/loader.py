"""Import a Hugging Face model folder into a moelab `Transformer`, lazily.

The model is built on the ``meta`` device (no memory), every expected tensor is looked
up in the safetensors files, checked for shape, cast if needed and assigned with
``load_state_dict(assign=True)``: the only full copy of the weights is the model's own.
Per-expert checkpoints are stacked into ``[E, ...]`` tensors one layer at a time (the
stack is a copy by nature; the per-expert tensors it came from are freed right after).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.hf import adapter
from moelab.hf.mxfp4 import dequantize_mxfp4
from moelab.hf.weights import SafetensorsFolder
from moelab.model import ModelConfig, Transformer

log = logging.getLogger(__name__)


@dataclass
class HFImport:
    model: Transformer  # eval mode
    config: ModelConfig
    family: str  # the HF model_type
    source: Path
    tokenizer_path: Path | None
    # How the checkpoint laid its experts out: {"experts": "stacked" | "per_expert", "moe": the
    # MoE module's name on disk}; what `export_hf` writes back for an import-only family.
    layout: dict = field(default_factory=dict)


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def load_hf(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> HFImport:
    """Load a local HF model folder (config.json + safetensors) as a moelab model."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    imported = adapter.config_from_hf(read_hf_config(folder), source=str(folder / "config.json"))
    cfg, family = imported.config, imported.family
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with SafetensorsFolder(folder) as st:
        layout: dict = {}
        state, used = _read_state(st, expected, cfg, family, dtype, layout)
        unused = [k for k in st.keys() if k not in used and not adapter.IGNORED_HF_KEYS.match(k)]
        if unused:
            raise CheckpointError(
                f"{st.file_of(unused[0])}: tensor {unused[0]!r} (and {len(unused) - 1} more) has no place in a "
                f"moelab {family} model with this config.json; refusing to drop weights silently"
            )
        model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _materialise_buffers(model)
    model = model.to(device).eval()
    tok = folder / "tokenizer.json"
    return HFImport(model, cfg, family, folder, tok if tok.is_file() else None, layout)


def from_pretrained(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """A moelab `Transformer` (eval mode) from a local Hugging Face model folder."""
    return load_hf(path, dtype=dtype, device=device).model


def _read_state(
    st: SafetensorsFolder,
    expected: dict[str, tuple[int, ...]],
    cfg: ModelConfig,
    family: str,
    dtype: torch.dtype,
    layout: dict,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def check(t: torch.Tensor, name: str, want: tuple[int, ...], ours: str) -> torch.Tensor:
        t = adapter.tensor_from_hf(family, ours, t)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{st.file_of(name)}: tensor {name!r} has shape {tuple(t.shape)}, expected {want} "
                f"for moelab {ours!r} (config.json and weights disagree)"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{st.file_of(name)}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        used.add(name)
        # Own the memory: a tensor backed by the file mapping decodes ~2x slower here
        # (page-cache pages, no huge pages) and pins the file. One tensor in flight at a time.
        return t.to(dtype) if t.dtype != dtype else t.clone()

    for key, shape in expected.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            if "lm_head.weight" in st:
                used.add("lm_head.weight")  # tied: some exporters store the copy anyway
            continue
        if family == "dbrx":  # fused Wqkv and [E F, D] expert matrices: several tensors per name
            names = adapter.dbrx_sources(key)
            absent = [n for n in names if n not in st]
            if absent:
                raise CheckpointError(f"{st.folder}: tensor {absent[0]!r} is missing (needed for moelab {key!r})")
            try:
                t = adapter.dbrx_from_hf(key, [st.get(n) for n in names], cfg)
            except RuntimeError as e:  # a reshape that the sizes do not allow
                raise CheckpointError(f"{st.file_of(names[0])}: tensor {names[0]!r} does not fit moelab {key!r} "
                                      f"{shape} (config.json and weights disagree: {e})") from None
            state[key] = check(t, names[0], shape, key)
            used.update(names)
            continue
        stacked = adapter.stacked_expert_param(key)
        if stacked is not None:
            state[key] = _read_experts(st, key, stacked, shape, family, check, used, layout)
            continue
        name = adapter.hf_key(key, family)
        if key.endswith("router.expert_bias") and name not in st and family not in adapter.CORRECTION_BIAS_FAMILIES:
            state[key] = torch.zeros(shape, dtype=torch.float32)  # a sigmoid router without a balancing bias
            continue
        if name not in st:
            for alt in adapter.moe_prefixes(family)[1:]:
                if adapter.hf_key(key, family, alt) in st:
                    name = adapter.hf_key(key, family, alt)
        if name not in st:
            raise CheckpointError(f"{st.folder}: tensor {name!r} is missing (needed for moelab {key!r})")
        state[key] = check(st.get(name), name, shape, key)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state, used


def _read_experts(st, key, stacked, shape, family, check, used, layout) -> torch.Tensor:
    """One layer's stacked expert tensor, from the stacked layout (float, or gpt-oss's MXFP4
    ``_blocks`` / ``_scales`` pair, dequantised: `moelab.hf.mxfp4`) or the per-expert one."""
    layer, which = stacked
    for moe in adapter.moe_prefixes(family):
        name = adapter.hf_key(key, family, moe)
        if name in st:
            layout.update(experts="stacked", moe=moe)
            return check(st.get(name), name, shape, key)
        if f"{name}_blocks" in st and f"{name}_scales" in st:
            layout.update(experts="stacked", moe=moe, mxfp4=True)
            w_EOI = dequantize_mxfp4(st.get(f"{name}_blocks"), st.get(f"{name}_scales"),
                                     name=f"{st.file_of(name + '_blocks')}: {name}_blocks")
            used.add(f"{name}_scales")
            # MXFP4 rows are the columns of transformers' `x @ W` operand: back to that operand.
            return check(w_EOI.transpose(1, 2), f"{name}_blocks", shape, key)
    E = shape[0]
    for moe in adapter.moe_prefixes(family):
        if adapter.per_expert_keys(layer, 0, family, moe)[0] in st:
            break
    layout.update(experts="per_expert", moe=moe)
    parts = []
    for e in range(E):
        gate, up, down = adapter.per_expert_keys(layer, e, family, moe)
        names = (gate, up) if which == "gate_up_proj" else (down,)
        for n in names:
            if n not in st:
                raise CheckpointError(
                    f"{st.folder}: tensor {n!r} is missing (expert {e} of layer {layer}; neither the stacked "
                    f"{adapter.hf_key(key, family)!r} nor the per-expert layout is complete)"
                )
        if which == "gate_up_proj":
            F_, D = shape[1] // 2, shape[2]
            parts.append(torch.cat([check(st.get(gate), gate, (F_, D), key), check(st.get(up), up, (F_, D), key)]))
        else:
            parts.append(check(st.get(down), down, tuple(shape[1:]), key))
    return torch.stack(parts)


def _materialise_buffers(model: Transformer) -> None:
    """Buffers that the checkpoint does not carry (none today) must not stay on meta."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
    for name, p in model.named_parameters():
        if p.is_meta:
            raise CheckpointError(f"internal: parameter {name!r} was not loaded")
