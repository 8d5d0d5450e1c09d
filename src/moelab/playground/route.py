"""The Route panel: one sentence through a real model, each token's top-k experts and
weights in every MoE layer (Mixtral's Figure 8, interactive).

The model is a moelab run or a Hugging Face folder (`moelab.hf.native.load_any`), with the
checkpoint's own tokenizer (as `moelab generate`). One forward pass over the whole
sentence with ``return_routing=True`` gives every position's decision at once; token text
is `moelab.lab.specialization.token_text.TokenText`'s (the coloured text of `moelab report`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.playground.config import FieldError

MAX_CHARS = 2000  # a sentence or a paragraph; longer text is cut by the model's context anyway


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    max_len: int
    num_experts: int
    top_k: int


class ModelCache:
    """The last few loaded models by path (loading costs seconds; typing a sentence must not)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._models: OrderedDict[tuple[Path, int], _Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> _Loaded:
        # Keyed by the weights' mtime too: a resumed Break run rewrites its checkpoint.
        key = (path, max((p.stat().st_mtime_ns for p in path.glob("*.safetensors")), default=0))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = _load(path)
            self._models[key] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return loaded


def _load(path: Path) -> _Loaded:
    from tokenizers import Tokenizer

    from moelab.hf.native import load_any

    try:
        loaded = load_any(path)
    except (ValueError, OSError) as e:
        raise FieldError(str(e), "model") from None
    moe = loaded.model.cfg.moe
    if moe is None:
        raise FieldError(f"{path}: a dense model has no router to show (pick an MoE run)", "model")
    tok_path = loaded.tokenizer_path
    if tok_path is None or not Path(tok_path).is_file():
        raise FieldError(f"{path}: no tokenizer.json found beside the checkpoint", "model")
    return _Loaded(loaded.model.eval(), Tokenizer.from_file(str(tok_path)), loaded.model.cfg.max_seq_len,
                   moe.num_experts, moe.top_k)


def route_text(cache: ModelCache, path: Path, text: str) -> dict[str, Any]:
    """Each token of `text` with, per MoE layer, its experts (first choice first) and weights."""
    import torch

    from moelab.lab.specialization.token_text import TokenText

    if not isinstance(text, str) or not text.strip():
        raise FieldError("text must be a non-empty string", "text")
    if len(text) > MAX_CHARS:
        raise FieldError(f"text has {len(text)} characters; at most {MAX_CHARS}", "text")
    m = cache.get(path)
    ids = m.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise FieldError("text encodes to no tokens", "text")
    if len(ids) > m.max_len:
        raise FieldError(f"text is {len(ids)} tokens; the model's context is {m.max_len}", "text")
    with torch.no_grad():
        out = m.model(torch.tensor([ids]), return_routing=True)
    routing = out.routing or {}
    layers = sorted(routing)
    # Sorted by weight so that index 0 is the first choice (the colour of the token).
    per_layer = {}
    for layer in layers:
        w_TK = routing[layer].weights.float()
        order_TK = w_TK.argsort(dim=-1, descending=True)
        per_layer[layer] = (routing[layer].expert_idx.gather(-1, order_TK).tolist(),
                            w_TK.gather(-1, order_TK).tolist())
    pieces = TokenText(m.tokenizer).pieces(ids)
    tokens = [
        {"id": tid, "text": piece,
         "layers": {str(layer): {"experts": per_layer[layer][0][t], "weights": per_layer[layer][1][t]}
                    for layer in layers}}
        for t, (tid, piece) in enumerate(zip(ids, pieces, strict=True))
    ]
    return {"model": str(path), "num_experts": m.num_experts, "top_k": m.top_k, "layers": layers,
            "tokens": tokens}


def find_models(roots: tuple[Path, ...], depth: int = 3) -> list[dict[str, Any]]:
    """Model folders under `roots` (moelab runs with weights, Hugging Face folders), for the
    Route panel's picker; `depth` levels below each root."""
    from moelab.rundir.files import is_run_dir

    found: list[dict[str, Any]] = []
    seen: set[Path] = set()

    def visit(d: Path, level: int) -> None:
        if d in seen or not d.is_dir():
            return
        seen.add(d)
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            found.append({"path": str(d), "kind": "moelab" if is_run_dir(d) else "hf", "name": d.name})
        if level < depth:
            for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(sub, level + 1)

    for root in roots:
        visit(root, 0)
    return found
