"""Export a moelab model as a Hugging Face folder that `AutoModelForCausalLM` loads.

Writes ``config.json`` (family from `adapter.hf_family_for`), ``generation_config.json``,
safetensors in the per-expert layout (sharded above ``max_shard_size``, with
``model.safetensors.index.json``) and, when a tokenizer is given, ``tokenizer.json`` and a
``tokenizer_config.json`` that makes `AutoTokenizer` build a fast tokenizer. The folder is
assembled under a temporary name and renamed into place, so a crash leaves no half export.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.hf import adapter
from moelab.hf.weights import write_sharded
from moelab.io import atomic_dir, atomic_path, atomic_write_json
from moelab.model import Transformer

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


@dataclass
class HFExport:
    out_dir: Path
    family: str
    files: list[Path]


def hf_tensors(model: Transformer, family: str, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs in layer order, experts split into the per-expert layout."""
    cfg = model.cfg
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF re-ties from tie_word_embeddings
        t = t.detach() if dtype is None else t.detach().to(dtype)
        stacked = adapter.stacked_expert_param(key)
        if stacked is None:
            yield adapter.hf_key(key, family), t
            continue
        yield from _per_expert(t, *stacked, family)


def _per_expert(t: torch.Tensor, layer: int, which: str, family: str,
                moe: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """A stacked expert tensor as the per-expert layout's (HF name, tensor) pairs: gate and
    up rows of ``gate_up_proj`` apart, ``down_proj`` as it is."""
    for e in range(t.shape[0]):
        gate, up, down = adapter.per_expert_keys(layer, e, family, moe)
        if which == "gate_up_proj":
            g, u = t[e].chunk(2, dim=0)
            yield gate, g.contiguous()
            yield up, u.contiguous()
        else:
            yield down, t[e].contiguous()


def _tokenizer_config(tokenizer_path: Path, max_len: int) -> dict:
    """A tokenizer_config.json for a bare tokenizer.json: the fast tokenizer class and the
    special tokens we can recognise by name (transformers needs them as strings)."""
    d: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    try:
        added = json.loads(tokenizer_path.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tokenizer_path}: not a valid tokenizer.json ({e})") from e
    for tok in added:
        content = tok.get("content", "")
        low = content.lower()
        if "eos" in low or low in ("</s>", "<|endoftext|>"):
            d.setdefault("eos_token", content)
        elif "bos" in low or low == "<s>":
            d.setdefault("bos_token", content)
        elif "pad" in low:
            d.setdefault("pad_token", content)
        elif "unk" in low:
            d.setdefault("unk_token", content)
    return d


def export_hf(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    hf_config: dict | None = None,
    hf_layout: dict | None = None,
) -> HFExport:
    """Write `model` to `out_dir` in Hugging Face format (see module docstring).

    ``hf_config`` / ``hf_layout``: the config.json the model was imported from and how its
    checkpoint laid the experts out (`HFImport.layout`; a run converted with ``convert
    --to-moelab`` records both). A model of a family moelab imports but cannot describe
    from its own config (DeepSeek, gpt-oss, Llama 4, ...) is exported through them:
    `_recorded_family_tensors`."""
    cfg = model.cfg
    out = Path(out_dir)
    try:
        family = adapter.hf_family_for(cfg)
    except ConfigError:
        if not (hf_config and hf_config.get("model_type") in adapter.IMPORT_ONLY_FAMILIES):
            raise  # names the unexpressible feature
        family = hf_config["model_type"]
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is a file, not a folder; choose a folder for the export")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
    if max_shard_size <= 0:
        raise CheckpointError(f"max_shard_size must be > 0 bytes, got {max_shard_size}")
    weight_dtype = dtype or next(model.parameters()).dtype
    dtype_name = str(weight_dtype).removeprefix("torch.")
    # atomic_dir: assembled beside `out` with the umask's mode (not mkdtemp's 0700); an existing
    # `out` is moved aside and removed only once the new folder is in place.
    recorded = family in adapter.IMPORT_ONLY_FAMILIES
    if recorded:
        tensors = _recorded_family_tensors(model, family, hf_config, hf_layout or {}, dtype)
    with atomic_dir(out) as tmp:
        if recorded:
            files = write_sharded(iter(tensors.items()), tmp, max_shard_size=max_shard_size)
            hf_cfg = {k: v for k, v in hf_config.items() if k != "quantization_config"}
            hf_cfg.update(dtype=dtype_name, torch_dtype=dtype_name)
        else:
            files = write_sharded(hf_tensors(model, family, dtype), tmp, max_shard_size=max_shard_size)
            hf_cfg = adapter.config_to_hf(cfg, dtype=dtype_name)
        gen_cfg: dict = {"do_sample": False}
        if tokenizer_path is not None:
            tokenizer_path = Path(tokenizer_path)
            if not tokenizer_path.is_file():
                raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
            with atomic_path(tmp / "tokenizer.json") as t:
                shutil.copyfile(tokenizer_path, t)
            tok_cfg = _tokenizer_config(tokenizer_path, cfg.max_seq_len)
            atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
            ids = _special_ids(tokenizer_path, tok_cfg)
            hf_cfg.update(ids)
            gen_cfg.update(ids)
        else:
            log.warning("no tokenizer given: %s will have weights and config only", out)
        atomic_write_json(tmp / "config.json", hf_cfg)
        atomic_write_json(tmp / "generation_config.json", gen_cfg)
    return HFExport(out, family, [out / f.name for f in files])


def _recorded_family_tensors(model: Transformer, family: str, hf_config: dict, layout: dict,
                             dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of `model` under its on-disk name, in the layout its checkpoint had
    (`layout`: stacked or per-expert experts, the MoE module's name), inverting the import
    mapping (`adapter.hf_key`, `adapter.per_expert_keys`, `adapter.tensor_to_hf`; Granite's
    shared gate and up joined into one ``input_linear``). MXFP4 experts come back as float
    (the config loses its ``quantization_config``). Refused, naming the field, when
    `hf_config` no longer describes the model (it would load as a different one)."""
    again = adapter.config_from_hf(hf_config, source="the recorded config.json").config
    if again != model.cfg:
        ours, theirs = model.cfg.to_dict(), again.to_dict()
        diff = next(f for f in ours if ours[f] != theirs[f])
        raise CheckpointError(f"cannot export: the model's ModelConfig.{diff} differs from the config.json it was "
                              f"imported from ({ours[diff]!r} vs {theirs[diff]!r})")
    if family == "dbrx":
        state = {k: (t.detach() if dtype is None else t.detach().to(dtype)) for k, t in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
        return adapter.dbrx_to_hf(state, model.cfg)
    moe = layout.get("moe") or adapter.moe_prefixes(family)[0]
    per_expert = layout.get("experts") == "per_expert"
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        t = t.detach() if dtype is None or not t.is_floating_point() else t.detach().to(dtype)
        stacked = adapter.stacked_expert_param(key)
        if stacked is not None and per_expert:
            out.update(_per_expert(t, *stacked, family, moe))
            continue
        if key.endswith("router.expert_bias") and family not in adapter.CORRECTION_BIAS_FAMILIES:
            if t.any():
                raise CheckpointError(f"cannot export: {key} is not zero, but {family} checkpoints have no "
                                      "selection bias (it was trained with bias balancing)")
            continue  # the importer's zero bias for a router that has none on disk
        name = adapter.hf_key(key, family, moe)
        t = adapter.tensor_to_hf(family, key, t)
        if family in adapter.GRANITE and re.search(r"shared_experts\.(gate|up)_proj\.weight$", key):
            # `shared_mlp.input_linear` is [gate | up] rows: gate comes first in the state dict.
            out[name] = torch.cat([out[name], t]) if name in out else t
            continue
        out[name] = t.contiguous()
    return out


def _special_ids(tokenizer_path: Path, tok_cfg: dict) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    ids = {}
    for name in ("bos", "eos", "pad"):
        content = tok_cfg.get(f"{name}_token")
        if content is not None and tok.token_to_id(content) is not None:
            ids[f"{name}_token_id"] = tok.token_to_id(content)
    return ids
