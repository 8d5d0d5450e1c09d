"""A run directory's weights (torch): save a model, load it back, check every tensor.

* One tie rule (`tied_names`): a state-dict entry that is the *same* tensor as an earlier
  one (a tied LM head) is stored once; `load_weights` / `load_model` re-tie it.
* `load_model` builds the `Transformer` on the ``meta`` device (no memory, no random
  init), checks every name and shape against the safetensors header, then reads one
  tensor at a time from the file (opened with `safe_open`, which memory-maps it) and
  assigns it with ``load_state_dict(assign=True)``: the model's own tensors are the only
  full copy of the weights. They are owned copies, not views of the file mapping: a
  mapped tensor decodes ~2x slower on CPU (page-cache pages, no huge pages) and would pin
  the file (see `moelab.hf.loader`).
* `assign_weights` is that second half on its own, for loaders that build a different
  module tree on meta first (`moelab.quant.load_quantized`: quantised experts).
* Every loader of a run first checks ``model.safetensors`` against the sha256 the run
  recorded (`verify_weights`): a flipped bit would otherwise load silently (a damaged
  exponent bit is a wrong model, not an error). The cost is one extra read of the file:
  ~1.4-1.6 GB/s with SHA-NI (`moelab.io.sha256_file`), so ~1 s per 1.5 GB, a minute for
  a 90 GB model; ``verify=False`` (``--no-verify``) skips it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moelab.errors import CheckpointError
from moelab.io import atomic_path, sha256_file
from moelab.model import ModelConfig, Transformer
from moelab.rundir.files import (
    MODEL_FILE,
    QUANT_METADATA_KEY,
    STATE_FILE,
    TOKENIZER_FILE,
    config_path,
    existing_run_paths,
    model_config_of,
    quant_of,
    read_run_config,
    recorded_sha256,
    tokenizer_of,
    write_run_config,
)


@dataclass(frozen=True)
class LoadedModel:
    model: Transformer  # in eval mode
    config: ModelConfig
    tokenizer_path: Path | None
    run_dir: Path
    # "moelab"; "moelab-int8" / "moelab-int4" / "moelab-bf16" for a quantised run
    # (`moelab.quant.load_quantized`); or the HF model_type for a model read by `moelab.hf.load_any`
    kind: str = "moelab"


# ---------------------------------------------------------------------------- ties


def tied_names(model: nn.Module) -> dict[str, str]:
    """``{name: earlier name}`` for state-dict entries that are the same tensor as an
    earlier entry (a tied LM head: ``lm_head.weight -> embed_tokens.weight``)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            tied[name] = first[id(t)]
        else:
            first[id(t)] = name
    return tied


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on CPU with each tied tensor once (safetensors refuses shared
    tensors); `load_weights` and `load_model` re-tie it."""
    tied = tied_names(model)
    return {
        name: t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if name not in tied
    }


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    for name, source in tied.items():
        prefix, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(prefix), leaf, model.get_parameter(source))


# ---------------------------------------------------------------------------- reading


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    with handle as f:
        yield f


def _get(f: Any, path: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor data (corrupt or truncated?): {e}") from None


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; damage raises `CheckpointError`."""
    path = Path(path)
    with _open(path) as f:
        return {k: _get(f, path, k) for k in f.keys()}, dict(f.metadata() or {})


# safetensors' dtype names, for the checks of tensors whose dtype must match exactly.
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def _check_names_and_shapes(f: Any, path: Path, model: nn.Module, tied: dict[str, str],
                            exact_dtype: frozenset[str] = frozenset(), ignore: frozenset[str] = frozenset()) -> None:
    """Every parameter and persistent buffer present with its shape (a tied one may be
    absent), nothing else but the names in `ignore`, and the names in `exact_dtype`
    stored in the model's dtype; read from the header, before any tensor data."""
    stored = set(f.keys())
    for name, t in model.state_dict().items():
        if name not in stored:
            if name in tied:
                continue
            raise CheckpointError(f"{path}: tensor {name!r} is missing (shape {tuple(t.shape)} expected)")
        got = tuple(f.get_slice(name).get_shape())
        if got != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {got}, the model expects {tuple(t.shape)} "
                "(the checkpoint was saved from a different model config)"
            )
        if name in exact_dtype:
            got_dtype, want = f.get_slice(name).get_dtype(), _ST_DTYPES.get(t.dtype, str(t.dtype))
            if got_dtype != want:
                raise CheckpointError(f"{path}: tensor {name!r} is stored as {got_dtype}, the model expects {want} "
                                      "(the file does not match its config.json)")
    unexpected = sorted(stored - set(model.state_dict()) - ignore)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} for this model config")


def load_weights(model: nn.Module, path: Path) -> dict[str, str]:
    """Copy the tensors of `path` into `model` in place, checking names and shapes first.

    Every parameter and persistent buffer must be present with its shape (a tied head may
    be absent); any difference raises `CheckpointError` naming the file and tensor.
    Returns the file's metadata.
    """
    path = Path(path)
    tied = tied_names(model)
    with _open(path) as f:
        _check_names_and_shapes(f, path, model, tied)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if name not in tied:
                    t.copy_(_get(f, path, name).to(t.dtype))
        return dict(f.metadata() or {})


def assign_weights(
    model: nn.Module,
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    exact_dtype: frozenset[str] = frozenset(),
    ignore: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Give `model` (built on the meta device) the tensors of `weights`, in place.

    Names and shapes (and, for the names in `exact_dtype`, dtypes) are checked against
    the file's header first; then one tensor at a time is read (an owned copy, in the
    model's dtype) and assigned with ``load_state_dict(assign=True)``, ties restored. A
    missing, corrupt or mismatched file raises `CheckpointError` naming the file (and
    the tensor). Tensors named in `ignore` may be in the file without being in the model
    (they are left unread: `moelab.offload` reads the experts itself). Returns the
    file's metadata.
    """
    tied = tied_names(model)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    with _open(weights) as f:
        _check_names_and_shapes(f, weights, model, tied, exact_dtype, ignore)
        for name, ref in expected.items():
            if name not in tied:
                # copy=True: own the memory instead of viewing the file mapping (docstring).
                state[name] = _get(f, weights, name).to(device=device, dtype=ref.dtype, copy=True)
        metadata = dict(f.metadata() or {})
    for name, source in tied.items():
        state[name] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, tied)
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise CheckpointError(f"internal: {name!r} of {weights} was not loaded")
    return metadata


def verify_weights(run_dir: Path, weights: Path, run_cfg: dict | None = None) -> bool:
    """Check `weights` against the sha256 its run recorded (module docstring); a mismatch
    raises `CheckpointError` naming the file and ``--no-verify``. Returns whether a digest
    was there to check (a run written before digests were recorded has none; a weights
    file other than the run's ``model.safetensors`` is not covered by it)."""
    if weights.name != MODEL_FILE or weights.parent != run_dir or not weights.is_file():
        return False
    digest = recorded_sha256(run_dir, run_cfg)
    if digest is None:
        return False
    if sha256_file(weights) != digest:
        where = STATE_FILE if (run_dir / STATE_FILE).is_file() else "config.json"
        raise CheckpointError(
            f"{weights} does not match the sha256 recorded in {run_dir / where}: the file is corrupt or was "
            "replaced; restore it (or pass --no-verify / verify=False to load it anyway)"
        )
    return True


def load_model(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """A trained model from a run directory (or its ``model.safetensors``), in eval mode.

    The model is built from the run's ``config.json`` on the meta device and its tensors
    assigned from the file (module docstring); a missing, corrupt or mismatched file
    raises `CheckpointError` naming the file (and the tensor), and so does a file whose
    sha256 differs from the recorded one (unless ``verify=False``). A quantised run (a
    "quant" entry in config.json) is refused: this layer knows no quantised experts.
    """
    run_dir, weights = existing_run_paths(path)
    run_cfg = read_run_config(run_dir)
    quant = quant_of(run_cfg)
    if quant is not None:
        fmt = quant.get("format") if isinstance(quant, dict) else quant
        raise CheckpointError(
            f"{config_path(run_dir)}: a quantised run (\"quant\": format {fmt!r}); "
            "load it with moelab.hf.load_any or moelab.quant.load_quantized"
        )
    cfg = model_config_of(run_cfg, run_dir)
    if verify:
        verify_weights(run_dir, weights, run_cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    assign_weights(model, weights, device=device)
    return LoadedModel(model=model.eval(), config=cfg, tokenizer_path=tokenizer_of(run_dir), run_dir=run_dir)


# ---------------------------------------------------------------------------- writing


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, byte-reproducible: the same tensors and metadata give
    the same bytes (and sha256) in every process.

    safetensors writes the header's ``__metadata__`` in its Rust hash map's order, which
    is randomised per process (20 saves of one dict gave 16 different files); the tensor
    entries are already in a fixed order. The header is rewritten in place with the
    metadata keys sorted: the same keys and values, so the same length.
    """
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw, object_pairs_hook=dict)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:
            raise CheckpointError(f"internal: {path}: the sorted safetensors header is longer than the original")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))  # safetensors pads its header with spaces


def save_weights(model: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write `model_state(model)` to `path` as is (callers make it atomic), byte-reproducibly."""
    save_safetensors(model_state(model), path, metadata={"format": "pt", **(metadata or {})})


def save_model(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    source: dict | None = None,
    train: dict | None = None,
    data: dict | None = None,
    quant: dict | None = None,
) -> Path:
    """Write `model` as a run directory (weights, tokenizer, config.json); returns it.

    Each file is written atomically; ``config.json`` comes last, with the weights'
    sha256 (which every loader checks), so a folder that `is_run_dir` recognises has its
    weights complete. `quant` (from
    `moelab.quant.checkpoint`) goes into config.json as its "quant" entry, and its
    "format" into the safetensors metadata as ``moelab_quant``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {QUANT_METADATA_KEY: str(quant["format"])} if quant is not None else None
    with atomic_path(out / MODEL_FILE) as tmp:
        save_weights(model, tmp, metadata=metadata)
        digest = sha256_file(tmp)
    if tokenizer_path is not None:
        with atomic_path(out / TOKENIZER_FILE) as tmp:
            shutil.copyfile(tokenizer_path, tmp)
    write_run_config(out, model.cfg, train, data, source=source, quant=quant, sha256={MODEL_FILE: digest})
    return out
