"""Export a moelab model as a GGUF file that llama.cpp runs as its ``llama`` architecture.

llama.cpp has no Mixtral architecture of its own: `convert_hf_to_gguf.py` writes Mixtral as
``llama`` with experts (``llama.expert_count`` > 0), and so do we. What this module owns:

- `gguf_refusal(cfg)`: why a config cannot be written (None when it can). The llama arch
  computes one thing: pre-norm RMSNorm blocks, full-rotary RoPE, GQA attention without
  biases or QK-norm, and *either* every layer a dense SwiGLU FFN *or* every layer a
  softmax-top-k MoE whose k weights are renormalised to sum to 1 (``norm_w = true`` in
  llama.cpp's `build_moe_ffn`) with no scaling, no token dropping and no shared experts.
  Everything else would load and run, and compute something else; it is refused instead.
- `gguf_tensors(model)`: (llama.cpp name, float32 array) pairs, experts stacked per layer
  (``ffn_gate_exps / ffn_up_exps`` ``[E, F, D]``, ``ffn_down_exps`` ``[E, D, F]`` in numpy
  order, which ggml reads as ``ne = [D, F, E]``), q/k rows permuted for llama.cpp's RoPE.
- `gguf_vocab(tokenizer.json, vocab_size)`: a byte-level BPE tokenizer as the ``gpt2``
  tokenizer model (tokens, types, merges, special ids).
- `export_gguf(model, out, ...)`: the file, written under a temporary name, read back and
  checked (`check_gguf`), then renamed into place.
- `read_gguf_tensors(path)`: every tensor of a GGUF file, dequantised to float32.

RoPE layout. Ours (and HF's) rotates the pairs ``(i, i + Dh/2)`` of a head (`rotate_half`);
llama.cpp's llama arch uses the original interleaved pairs ``(2i, 2i + 1)``. Attention
scores only depend on q.k, so reordering the rows of W_q and W_k the same way per head
turns one into the other: row ``2j + h`` of the new head is row ``h * Dh/2 + j`` of ours
(`LlamaModel.permute` in llama.cpp's converter, which undoes HF's own conversion).

Types (``--type``): ``f32``; ``f16`` / ``bf16`` (matrices in that type); ``q8_0`` (matrices
in blocks of 32 int8 with one fp16 scale; a matrix whose rows are not a multiple of 32
falls back to f16, as llama.cpp's converter does); ``q4_0`` (blocks of 32 4-bit codes with
one fp16 scale, symmetric; the output matrix in q8_0: `llama-quantize` keeps it at Q6_K
for its Q4 types, which the ``gguf`` package cannot write, so the next finer type it can;
the same f16 fallback). Norm weights and the router (``ffn_gate_inp``) stay f32 in every
type, as llama.cpp keeps them: a router rounding error flips which experts a token goes
to, a discontinuous change, for a tiny saving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.io import atomic_path
from moelab.model import ModelConfig, Transformer

if TYPE_CHECKING:
    import gguf as gguf_mod

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_BLOCKED = ("q8_0", "q4_0")  # types stored in blocks of 32 along a row
ARCH = "llama"
# llama.cpp token types (gguf.TokenType), spelled out so the vocab needs no gguf import.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_Q8_BLOCK = 32


def _gguf() -> gguf_mod:
    try:
        import gguf
    except ImportError as e:
        raise ConfigError("GGUF export needs the 'gguf' package: pip install 'moelab[gguf]' (or pip install gguf)") from e
    return gguf


# ---------------------------------------------------------------------------------------
# What the llama arch can express


def gguf_refusal(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as a llama-arch GGUF (one phrase), or None if it can."""
    # Features of the families imported with issue #15 (DeepSeek, gpt-oss, Llama 4, Granite, ...).
    for name, default in (("attention", "gqa"), ("attn_sinks", False), ("o_bias", False), ("rotary_dim", None),
                          ("rope_interleave", False), ("nope_layers", ()), ("rope_yarn", None), ("rope_scaling", None),
                          ("attn_scale", None),
                          ("sliding_layers", None), ("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
                          ("logits_scaling", 1.0), ("norm", "rms")):
        if getattr(cfg, name) != default:
            return f"ModelConfig.{name}={getattr(cfg, name)!r} (not expressible in the llama arch)"
    if cfg.moe is not None:
        for name, default in (("router_bias", False), ("expert_proj_bias", False), ("weight_on_input", False),
                              ("n_group", 1), ("selection_bias", False)):
            if getattr(cfg.moe, name) != default:
                return f"MoEConfig.{name}={getattr(cfg.moe, name)!r} (not expressible in the llama arch)"
    if cfg.qk_norm is not None:
        return f"qk_norm={cfg.qk_norm!r} (the llama arch has no QK-norm)"
    if cfg.attn_bias:
        return "attn_bias=True (the llama arch has no q/k/v biases)"
    if cfg.clip_qkv is not None:
        return f"clip_qkv={cfg.clip_qkv} (the llama arch does not clamp q/k/v)"
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        return f"sliding_window={cfg.sliding_window} (the llama arch attends to the whole context)"
    m = cfg.moe
    if m is None:
        return None
    moe_layers = cfg.moe_layers
    if moe_layers != list(range(cfg.n_layers)):
        dense = [i for i in range(cfg.n_layers) if i not in moe_layers]
        return f"dense layers {dense} in an MoE model (the llama arch has experts in every layer or in none)"
    if m.router != "softmax":
        return f"MoEConfig.router={m.router!r} (llama.cpp's llama arch routes with softmax top-k)"
    if not m.norm_topk_prob:
        return "MoEConfig.norm_topk_prob=False (llama.cpp renormalises the top-k weights, as Mixtral does)"
    if m.routed_scaling_factor != 1.0:
        return f"MoEConfig.routed_scaling_factor={m.routed_scaling_factor} (the llama arch does not scale expert weights)"
    if m.router_dtype != "float32":
        return f"MoEConfig.router_dtype={m.router_dtype!r} (llama.cpp computes router logits in float32)"
    if m.activation != "swiglu":
        return f"MoEConfig.activation={m.activation!r} (llama.cpp's llama experts are SwiGLU)"
    if m.num_shared_experts:
        return f"MoEConfig.num_shared_experts={m.num_shared_experts} (the llama arch has no shared experts)"
    if m.capacity_factor is not None:
        return f"MoEConfig.capacity_factor={m.capacity_factor} (llama.cpp is dropless: every routed token is computed)"
    return None


def check_gguf_exportable(cfg: ModelConfig) -> None:
    """Raise `ConfigError` naming what llama.cpp's llama arch cannot express."""
    why = gguf_refusal(cfg)
    if why is not None:
        raise ConfigError(f"cannot export to GGUF: {why}")


# ---------------------------------------------------------------------------------------
# Tensors


def permute_rope_rows(w_OD: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of W_q / W_k from half-split RoPE pairs to interleaved ones (per head)."""
    half = w_OD.shape[0] // n_heads // 2  # Dh / 2
    return w_OD.reshape(n_heads, 2, half, *w_OD.shape[1:]).swapaxes(1, 2).reshape(w_OD.shape)


_NAMES: tuple[tuple[str, str], ...] = (
    (r"embed_tokens\.weight", "token_embd.weight"),
    (r"norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.weight", r"blk.\1.attn_k.weight"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.weight", r"blk.\1.attn_v.weight"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"layers\.(\d+)\.mlp\.router\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.down_proj", r"blk.\1.ffn_down_exps.weight"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
)
_GATE_UP = re.compile(r"layers\.(\d+)\.mlp\.experts\.gate_up_proj")


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp tensor name, float32 numpy array) pairs, in the model's order.

    A tensor this table does not know (a quantised expert buffer, a new module) raises
    rather than being left out of the file.
    """
    cfg = model.cfg
    check_gguf_exportable(cfg)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd when `output` is absent
        if not t.is_floating_point():
            raise ConfigError(f"cannot export to GGUF: tensor {key!r} is {t.dtype} (a quantised model?); export a float run")
        a = t.detach().to(device="cpu", dtype=torch.float32).numpy()
        if m := _GATE_UP.fullmatch(key):
            gate_EFD, up_EFD = np.split(a, 2, axis=1)  # gate rows, then up rows
            yield f"blk.{m.group(1)}.ffn_gate_exps.weight", np.ascontiguousarray(gate_EFD)
            yield f"blk.{m.group(1)}.ffn_up_exps.weight", np.ascontiguousarray(up_EFD)
            continue
        for pattern, template in _NAMES:
            if m := re.fullmatch(pattern, key):
                name = m.expand(template)
                break
        else:
            raise ConfigError(f"cannot export to GGUF: tensor {key!r} has no llama.cpp equivalent")
        if name.endswith("attn_q.weight"):
            a = permute_rope_rows(a, cfg.n_heads)
        elif name.endswith("attn_k.weight"):
            a = permute_rope_rows(a, cfg.kv_heads)
        yield name, np.ascontiguousarray(a)


def tensor_type(name: str, a: np.ndarray, file_type: str) -> str:
    """The GGML type one tensor is stored in for `file_type` (see module docstring)."""
    if file_type == "f32" or a.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return "f32"
    if file_type in _BLOCKED and a.shape[-1] % _Q8_BLOCK:
        return "f16"  # the blocks run along rows; llama.cpp's converter falls back the same way
    if file_type == "q4_0" and name == "output.weight":
        return "q8_0"  # the LM head finer than the rest (module docstring)
    return file_type


# ---------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None


def gguf_vocab(tokenizer_path: str | Path, vocab_size: int) -> GGUFVocab:
    """Read a byte-level BPE ``tokenizer.json`` as llama.cpp's ``gpt2`` tokenizer.

    Ids the tokenizer does not use (a model vocab padded beyond it) become ``[PAD<i>]``
    tokens of type UNUSED, as llama.cpp's converter writes them. EOS is the token named
    like ``<|endoftext|>`` / ``</s>`` / ``eos``; with no BOS token, BOS is EOS (GPT-2's
    convention) and the file says not to add it.
    """
    path = Path(tokenizer_path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from e
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"{path}: tokenizer model {model.get('type')!r} is not supported for GGUF (only byte-level BPE)")
    if not _is_gpt2_byte_level(d.get("pre_tokenizer")):
        raise ConfigError(
            f"{path}: pre-tokenizer {json.dumps(d.get('pre_tokenizer'))[:120]} is not supported for GGUF "
            "(only ByteLevel with the GPT-2 regex, which llama.cpp calls 'gpt-2')"
        )
    if d.get("normalizer") is not None:
        raise ConfigError(f"{path}: a tokenizer normalizer is not supported for GGUF (llama.cpp's gpt2 tokenizer has none)")
    # BPE options llama.cpp's gpt2 tokenizer does not apply (it merges by rank, whole words)
    for opt in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges", "byte_fallback"):
        if model.get(opt):
            raise ConfigError(f"{path}: BPE option {opt}={model[opt]!r} is not supported for GGUF")
    by_id: dict[int, str] = {i: tok for tok, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in d.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise ConfigError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size={vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {"eos": None, "bos": None, "pad": None}
    for i, a in sorted(added.items()):
        low = a["content"].lower()
        if "eos" in low or low in ("</s>", "<|endoftext|>"):
            special["eos"] = special["eos"] if special["eos"] is not None else i
        elif "bos" in low or low == "<s>":
            special["bos"] = special["bos"] if special["bos"] is not None else i
        elif "pad" in low:
            special["pad"] = special["pad"] if special["pad"] is not None else i
    bos = special["bos"] if special["bos"] is not None else special["eos"]
    return GGUFVocab(tokens, types, merges, special["eos"], bos, special["pad"])


def _is_gpt2_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers") or []
        return len(items) == 1 and _is_gpt2_byte_level(items[0])
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


# ---------------------------------------------------------------------------------------
# Writing and reading back


@dataclass
class GGUFExport:
    path: Path
    file_type: str
    n_tensors: int
    n_bytes: int
    types: dict[str, int]  # GGML type -> number of tensors stored in it
    max_abs_err: dict[str, float]  # GGML type -> largest |read back - ours| over its tensors


@contextlib.contextmanager
def _quiet_gguf_writer() -> Iterator[None]:
    """The gguf package logs the temporary file name at INFO; keep that out of our output."""
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _qtype(name: str) -> Any:
    g = _gguf()
    return {"f32": g.GGMLQuantizationType.F32, "f16": g.GGMLQuantizationType.F16,
            "bf16": g.GGMLQuantizationType.BF16, "q8_0": g.GGMLQuantizationType.Q8_0,
            "q4_0": g.GGMLQuantizationType.Q4_0}[name]


def _file_type(name: str) -> int:
    g = _gguf()
    return {"f32": g.LlamaFileType.ALL_F32, "f16": g.LlamaFileType.MOSTLY_F16,
            "bf16": g.LlamaFileType.MOSTLY_BF16, "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": g.LlamaFileType.MOSTLY_Q4_0}[name]


def _write_metadata(w: Any, cfg: ModelConfig, vocab: GGUFVocab, file_type: str, name: str) -> None:
    m = cfg.moe
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(m.d_expert if m is not None else cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.dim_head)
    w.add_value_length(cfg.dim_head)
    w.add_rope_dimension_count(cfg.dim_head)  # RoPE over the whole head
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if m is not None:
        w.add_expert_count(m.num_experts)
        w.add_expert_used_count(m.top_k)
    w.add_file_type(_file_type(file_type))
    if file_type in _BLOCKED:
        w.add_quantization_version(_gguf().GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.eos_id is not None:
        w.add_eos_token_id(vocab.eos_id)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    # moelab never prepends BOS or appends EOS to a prompt; llama.cpp must not either.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def export_gguf(
    model: Transformer,
    out_path: str | Path,
    *,
    tokenizer_path: str | Path | None,
    file_type: str = "f32",
    overwrite: bool = False,
    name: str = "moelab",
    verify: bool = True,
) -> GGUFExport:
    """Write `model` as a llama-arch GGUF file (see module docstring).

    The file is written under a temporary name beside `out_path`; with `verify` it is read
    back (`check_gguf`) before being renamed into place, so a failure at any step leaves
    no file and an existing `out_path` untouched. Holds the converted tensors in memory
    (about the output file's size) while writing; the check holds one tensor at a time.
    """
    g = _gguf()
    if file_type not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {file_type!r} is unknown; choose one of {', '.join(GGUF_TYPES)}")
    cfg = model.cfg
    check_gguf_exportable(cfg)
    out = Path(out_path)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a folder; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: exists (pass overwrite=True / --overwrite to replace it)")
    if tokenizer_path is None:
        raise ConfigError("GGUF export needs a tokenizer.json (the run has none; pass --tokenizer PATH)")
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
    vocab = gguf_vocab(tokenizer_path, cfg.vocab_size)

    types: dict[str, int] = {}
    with atomic_path(out) as tmp, _quiet_gguf_writer():
        w = g.GGUFWriter(str(tmp), ARCH)
        try:
            _write_metadata(w, cfg, vocab, file_type, name)
            for tname, a in gguf_tensors(model):
                ttype = tensor_type(tname, a, file_type)
                types[ttype] = types.get(ttype, 0) + 1
                if ttype == "f32":
                    w.add_tensor(tname, a)
                else:
                    w.add_tensor(tname, g.quants.quantize(a, _qtype(ttype)), raw_dtype=_qtype(ttype))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
            del w  # the converted tensors; the check below reads one tensor at a time
        errs = check_gguf(tmp, model, file_type) if verify else {}
        n_tensors = sum(types.values())
        n_bytes = tmp.stat().st_size
    log.debug("wrote %s: %d tensors, %s, %.1f MB", out, n_tensors, types, n_bytes / 1e6)
    return GGUFExport(out, file_type, n_tensors, n_bytes, types, errs)


def _dequantized(t: Any) -> tuple[np.ndarray, str]:
    g = _gguf()
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists ne0 (the row) first
    a = g.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
    return a, t.tensor_type.name.lower()


def read_gguf_tensors(path: str | Path) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (float32 array in numpy order, GGML type name) for every tensor in the file."""
    return {t.name: _dequantized(t) for t in _gguf().GGUFReader(str(path)).tensors}


def _block_bound(a: np.ndarray, top_code: int, steps: float) -> np.ndarray:
    """``steps`` quantisation steps of each 32-block (step = amax / `top_code`) plus the
    fp16 rounding of the stored step times the largest code, per element of `a`."""
    blocks = a.reshape(-1, _Q8_BLOCK)
    step = np.abs(blocks).max(axis=1, keepdims=True) / top_code
    return np.broadcast_to(step * (steps + top_code * 2.0**-11) + 1e-12, blocks.shape).reshape(a.shape)


def q8_0_bound(a: np.ndarray) -> np.ndarray:
    """The largest |dequant(quant(x)) - x| Q8_0 allows per element: half a step of its block
    (step = amax/127) plus the fp16 rounding of the stored step times the largest code, 127."""
    return _block_bound(a, 127, 0.5)


def q4_0_bound(a: np.ndarray) -> np.ndarray:
    """The largest |dequant(quant(x)) - x| Q4_0 allows per element. Q4_0 maps a block's value
    of largest magnitude to code 0 (scale d = that value / -8) and clamps codes at 15, so a
    value of the opposite sign near that magnitude is off by up to a whole step |d|; plus
    the fp16 rounding of d times the largest code, 8."""
    return _block_bound(a, 8, 1.0)


def check_gguf(path: str | Path, model: Transformer, file_type: str) -> dict[str, float]:
    """Read `path` back and compare every tensor with `model`'s, one tensor at a time.

    f32 must be bit-identical; f16 equal to our own cast; bf16 within half a bf16 ulp;
    q8_0 within `q8_0_bound`, q4_0 within `q4_0_bound`. Returns the largest absolute error per GGML type; raises
    `CheckpointError` naming the first tensor that is missing, extra, mis-typed,
    mis-shaped or off.
    """
    in_file = {t.name: t for t in _gguf().GGUFReader(str(path)).tensors}
    errs: dict[str, float] = {}
    seen = set()
    for name, want in gguf_tensors(model):
        seen.add(name)
        if name not in in_file:
            raise CheckpointError(f"{path}: tensor {name} is missing when read back")
        a, gtype = _dequantized(in_file[name])
        ttype = tensor_type(name, want, file_type)
        if gtype != ttype or a.shape != want.shape:
            raise CheckpointError(f"{path}: {name} read back as {gtype} {a.shape}, wrote {ttype} {want.shape}")
        err = np.abs(a - want)
        if ttype == "f32":
            ok = np.array_equal(a, want)
        elif ttype == "f16":
            ok = np.array_equal(a, want.astype(np.float16).astype(np.float32))
        elif ttype == "bf16":
            ok = bool(np.all(err <= np.abs(want) * 2.0**-8))
        elif ttype == "q8_0":
            ok = bool(np.all(err <= q8_0_bound(want)))
        else:  # q4_0
            ok = bool(np.all(err <= q4_0_bound(want)))
        if not ok:
            raise CheckpointError(f"{path}: {name} ({ttype}) reads back off by up to {float(err.max()):.3g}")
        errs[ttype] = max(errs.get(ttype, 0.0), float(err.max()) if err.size else 0.0)
    if extra := sorted(set(in_file) - seen):
        raise CheckpointError(f"{path}: unexpected tensors read back: {extra}")
    return errs


def export_gguf_from(
    source: str | Path,
    out_path: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    file_type: str = "f32",
    overwrite: bool = False,
    verify: bool = True,
) -> GGUFExport:
    """`export_gguf` of a moelab run / checkpoint or an HF folder (`moelab.hf.load_any`).

    Quantised moelab runs are refused: their int8/int4 expert formats are not GGUF's, and
    dequantising them would write a model no one trained under a float type's name.
    """
    from moelab.hf.native import load_any

    out = Path(out_path)
    if out.exists() and not overwrite:  # before loading: a wrong flag should fail fast
        raise CheckpointError(f"{out}: exists (pass overwrite=True / --overwrite to replace it)")
    if file_type not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {file_type!r} is unknown; choose one of {', '.join(GGUF_TYPES)}")
    loaded = load_any(source, verify=verify)
    if loaded.kind.startswith("moelab-"):
        raise ConfigError(
            f"cannot export to GGUF: {source} is a quantised moelab run ({loaded.kind}); export the float run it came from"
        )
    return export_gguf(
        loaded.model,
        out,
        tokenizer_path=tokenizer_path or loaded.tokenizer_path,
        file_type=file_type,
        overwrite=overwrite,
        name=(p.parent if (p := Path(source).resolve()).is_file() else p).name,
    )
