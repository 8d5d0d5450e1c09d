"""GGUF export (`moelab.hf.gguf`): what is written, read back, refused, and what llama.cpp computes.

Three levels of evidence, cheapest first:
  1. read-back: `gguf.GGUFReader` returns the tensors we meant to write (dequantised for
     q8_0 within its rounding bound), with the metadata llama.cpp reads;
  2. a float64 re-implementation of llama.cpp's llama-arch graph (interleaved RoPE, softmax
     top-k renormalised) run on the tensors *as read from the file* gives our logits --
     this pins names, layouts and the q/k permutation without llama.cpp;
  3. llama.cpp itself (llama-cpp-python), when installed: logits and greedy tokens.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.hf import gguf as G
from moelab.model import ModelConfig, Transformer
from moelab.model.layers import apply_rope, rope_cos_sin
from moelab.moe import MoEConfig

gguf = pytest.importorskip("gguf")

V = 320  # > the tokenizer's 300 tokens: the tail is written as [PAD<i>] tokens


def tiny_cfg(moe: bool = True, **kw) -> ModelConfig:
    """Dims llama.cpp accepts (head_dim 32) and that Q8_0 blocks divide (rows of 64)."""
    m = MoEConfig(d_model=64, d_expert=64, num_experts=4, top_k=2) if moe else None
    base = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=96, max_seq_len=128,
                rope_theta=5e5, norm_eps=1e-5, moe=m)
    return ModelConfig(**{**base, **kw})


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.3) -> Transformer:
    """Weights large enough that routing and logits vary (the default init hides mistakes)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std if "embed" not in name else 1.0)
            else:
                p.normal_(1, 0.2)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from moelab.data.tokenizer import save_tokenizer, train_tokenizer

    text = ["the quick brown fox jumps over the lazy dog, again and again. " * 20,
            "def f(x):\n    return x + 1\n" * 10]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(text, vocab_size=300), path)
    return path


def export(model, tmp_path, tokenizer, file_type="f32", name="m.gguf", **kw):
    return G.export_gguf(model, tmp_path / name, tokenizer_path=tokenizer, file_type=file_type, **kw)


# ---------------------------------------------------------------------------------------
# 1. read back


@pytest.mark.parametrize("file_type", G.GGUF_TYPES)
def test_read_back_gives_the_tensors_written(tmp_path, tokenizer, file_type):
    model = random_model(tiny_cfg())
    res = export(model, tmp_path, tokenizer, file_type)
    got = G.read_gguf_tensors(res.path)
    ours = dict(G.gguf_tensors(model))
    assert set(got) == set(ours) and res.n_tensors == len(ours) == 3 + 2 * 10  # per block: 2 norms, q k v o, router, 3 expert stacks
    for name, want in ours.items():
        a, ttype = got[name]
        assert a.shape == want.shape, name
        if want.ndim == 1 or "ffn_gate_inp" in name or file_type == "f32":
            assert ttype == "f32" and np.array_equal(a, want), name  # norms and router stay exact
            continue
        assert ttype == ("q8_0" if file_type == "q4_0" and name == "output.weight" else file_type), name
        if file_type == "f16":
            np.testing.assert_array_equal(a, want.astype(np.float16).astype(np.float32))
        elif file_type == "bf16":
            np.testing.assert_allclose(a, want, rtol=2**-8, atol=0)
        elif ttype == "q8_0":  # half a step of each 32-block (step = amax / 127), plus the
            # fp16 rounding of the stored step times the largest code, 127
            step = np.abs(want.reshape(-1, 32)).max(axis=1) / 127
            err = np.abs(a - want).reshape(-1, 32).max(axis=1)
            assert np.all(err <= step * (0.5 + 127 * 2**-11) + 1e-9), name
            assert err.max() > 0  # it really was quantised
        else:  # q4_0: a whole step of each 32-block at most (step = amax / 8: the code of
            # the largest value is 0, the other end clamps at 15), plus the fp16 rounding
            step = np.abs(want.reshape(-1, 32)).max(axis=1) / 8
            err = np.abs(a - want).reshape(-1, 32).max(axis=1)
            assert np.all(err <= step * (1 + 8 * 2**-11) + 1e-9), name
            assert err.max() > np.abs(want).max() / 127  # coarser than q8_0 could be
    assert set(res.max_abs_err) == set(res.types)


@pytest.mark.parametrize("file_type", ["f32", "q8_0", "q4_0"])
def test_the_read_back_check_catches_a_changed_tensor(tmp_path, tokenizer, file_type):
    model = random_model(tiny_cfg())
    res = export(model, tmp_path, tokenizer, file_type)
    assert G.check_gguf(res.path, model, file_type)  # the file as written passes
    t = next(t for t in gguf.GGUFReader(str(res.path)).tensors if t.name == "blk.1.attn_k.weight")
    raw = bytearray(res.path.read_bytes())
    raw[t.data_offset + 8] ^= 0x40  # one byte inside the tensor's data
    res.path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="blk.1.attn_k.weight"):
        G.check_gguf(res.path, model, file_type)


def test_metadata_is_what_llama_cpp_reads(tmp_path, tokenizer):
    cfg = tiny_cfg()
    res = export(random_model(cfg), tmp_path, tokenizer, "q8_0")
    r = gguf.GGUFReader(str(res.path))

    def field(key):
        f = r.fields[key]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return f.contents()
        return f.contents()

    assert field("general.architecture") == "llama"
    expect = {"llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
              "llama.feed_forward_length": 64, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
              "llama.rope.dimension_count": 32, "llama.attention.key_length": 32, "llama.expert_count": 4,
              "llama.expert_used_count": 2, "llama.vocab_size": V,
              "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    for key, value in expect.items():
        assert field(key) == value, key
    assert field("llama.rope.freq_base") == pytest.approx(5e5)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == V
    assert tokens[:2] == ["<|endoftext|>", "<|pad|>"] and types[:2] == [G.CONTROL, G.CONTROL]
    assert tokens[-1] == f"[PAD{V - 1}]" and types[-1] == G.UNUSED and types[300:] == [G.UNUSED] * (V - 300)
    assert field("tokenizer.ggml.eos_token_id") == 0 and field("tokenizer.ggml.padding_token_id") == 1
    assert field("tokenizer.ggml.bos_token_id") == 0 and field("tokenizer.ggml.add_bos_token") is False
    assert len(field("tokenizer.ggml.merges")) == 300 - 258


def test_q8_0_falls_back_to_f16_where_rows_are_not_blocks(tmp_path, tokenizer):
    cfg = tiny_cfg(moe=False, d_ff=48)  # ffn_down rows have 48 elements
    res = export(random_model(cfg), tmp_path, tokenizer, "q8_0")
    got = G.read_gguf_tensors(res.path)
    assert got["blk.0.ffn_down.weight"][1] == "f16" and got["blk.0.ffn_up.weight"][1] == "q8_0"


def test_tied_embeddings_write_no_output_tensor(tmp_path, tokenizer):
    res = export(random_model(tiny_cfg(tie_embeddings=True)), tmp_path, tokenizer)
    assert "output.weight" not in G.read_gguf_tensors(res.path)  # llama.cpp falls back to token_embd


# ---------------------------------------------------------------------------------------
# 2. llama.cpp's llama graph, re-implemented in float64 on the tensors read from the file


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_interleaved(x_THD, base):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate the pairs (2j, 2j+1) by pos * base^(-2j/Dh)."""
    T, _, Dh = x_THD.shape
    ang = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x0, x1 = x_THD[..., 0::2], x_THD[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def llama_cpp_reference(path, cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    t = {k: torch.from_numpy(np.array(a)).double() for k, (a, _) in G.read_gguf_tensors(path).items()}
    H, Hkv, Dh, eps = cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.norm_eps
    T = len(ids)
    x = t["token_embd.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        b = lambda n, i=i: t[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = _rms(x, b("attn_norm"), eps)
        q = _rope_interleaved((h @ b("attn_q").T).view(T, H, Dh), cfg.rope_theta)
        k = _rope_interleaved((h @ b("attn_k").T).view(T, Hkv, Dh), cfg.rope_theta)
        v = (h @ b("attn_v").T).view(T, Hkv, Dh)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(Dh)
        a = s.masked_fill(~causal, -torch.inf).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", a, v).reshape(T, H * Dh) @ b("attn_output").T
        h = _rms(x, b("ffn_norm"), eps)
        if cfg.moe is None:
            x = x + (torch.nn.functional.silu(h @ b("ffn_gate").T) * (h @ b("ffn_up").T)) @ b("ffn_down").T
            continue
        p = (h @ b("ffn_gate_inp").T).softmax(-1)
        w, e = p.topk(cfg.moe.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)  # norm_w = true
        y = torch.zeros_like(x)
        for tok in range(T):
            for kk in range(cfg.moe.top_k):
                ex = int(e[tok, kk])
                g = torch.nn.functional.silu(b("ffn_gate_exps")[ex] @ h[tok]) * (b("ffn_up_exps")[ex] @ h[tok])
                y[tok] += w[tok, kk] * (b("ffn_down_exps")[ex] @ g)
        x = x + y
    out = t.get("output.weight", t["token_embd.weight"])
    return _rms(x, t["output_norm.weight"], eps) @ out.T


@pytest.mark.parametrize("kind", ["moe", "dense", "tied_mha"])
def test_llama_graph_on_the_file_gives_our_logits(tmp_path, tokenizer, kind):
    cfg = {"moe": tiny_cfg(), "dense": tiny_cfg(moe=False),
           "tied_mha": tiny_cfg(n_kv_heads=None, tie_embeddings=True)}[kind]
    model = random_model(cfg, seed=1).double()
    res = export(model, tmp_path, tokenizer)
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits[0]
    ref = llama_cpp_reference(res.path, cfg, ids[0].tolist())
    # float64 model written as f32: the difference is the f32 rounding of the weights
    torch.testing.assert_close(ref, ours, rtol=0, atol=1e-4)


def test_permuted_rows_under_interleaved_rope_give_the_same_scores():
    """q.k with our half-split RoPE == q'.k' with llama.cpp's interleaved RoPE on permuted rows."""
    torch.manual_seed(0)
    H, Dh, D, T = 3, 16, 24, 7
    wq, wk, x = torch.randn(H * Dh, D, dtype=torch.float64), torch.randn(H * Dh, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(T)[None], Dh, 1e4, torch.float64)
    q = apply_rope((x @ wq.T).view(1, T, H, Dh).transpose(1, 2), cos, sin)[0]  # [H, T, Dh]
    k = apply_rope((x @ wk.T).view(1, T, H, Dh).transpose(1, 2), cos, sin)[0]
    ours = q @ k.transpose(-1, -2)
    pq = torch.from_numpy(G.permute_rope_rows(wq.numpy(), H))
    pk = torch.from_numpy(G.permute_rope_rows(wk.numpy(), H))
    q2 = _rope_interleaved((x @ pq.T).view(T, H, Dh), 1e4).transpose(0, 1)
    k2 = _rope_interleaved((x @ pk.T).view(T, H, Dh), 1e4).transpose(0, 1)
    torch.testing.assert_close(q2 @ k2.transpose(-1, -2), ours)
    # ...and without the permutation they differ (the test can fail)
    q3 = _rope_interleaved((x @ wq.T).view(T, H, Dh), 1e4).transpose(0, 1)
    k3 = _rope_interleaved((x @ wk.T).view(T, H, Dh), 1e4).transpose(0, 1)
    assert (q3 @ k3.transpose(-1, -2) - ours).abs().max() > 1


# ---------------------------------------------------------------------------------------
# refusals and file handling

REFUSED = {
    "qk_norm": (dict(qk_norm="head"), "qk_norm"),
    "attn_bias": (dict(attn_bias=True), "attn_bias"),
    "clip_qkv": (dict(qk_norm="full", clip_qkv=1.0), "qk_norm"),
    "sliding_window": (dict(sliding_window=16), "sliding_window"),
    "mixed_layers": (dict(first_dense_layers=1), "dense layers [0]"),
    "moe_every_other": (dict(moe_layer_freq=2), "dense layers [0]"),
    "sigmoid": (dict(moe_kw=dict(router="sigmoid")), "router='sigmoid'"),
    "switch": (dict(moe_kw=dict(router="switch", top_k=1)), "router='switch'"),
    "no_renorm": (dict(moe_kw=dict(norm_topk_prob=False)), "norm_topk_prob"),
    "scaling": (dict(moe_kw=dict(routed_scaling_factor=2.5)), "routed_scaling_factor"),
    "router_bf16": (dict(moe_kw=dict(router_dtype="bfloat16")), "router_dtype"),
    "gelu": (dict(moe_kw=dict(activation="gelu")), "activation"),
    "shared": (dict(moe_kw=dict(num_shared_experts=1)), "num_shared_experts"),
    "capacity": (dict(moe_kw=dict(capacity_factor=1.25)), "capacity_factor"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refuses_what_the_llama_arch_cannot_express(tmp_path, tokenizer, case):
    kw, needle = REFUSED[case]
    kw = dict(kw)
    moe_kw = kw.pop("moe_kw", {})
    cfg = tiny_cfg(**kw)
    if moe_kw:
        cfg = cfg.with_(moe=MoEConfig(**{**cfg.moe.to_dict(), **moe_kw}))
    with pytest.raises(ConfigError, match="cannot export to GGUF") as e:
        export(Transformer(cfg), tmp_path, tokenizer)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_allows_a_window_no_shorter_than_the_context_and_top1_softmax():
    assert G.gguf_refusal(tiny_cfg(sliding_window=128)) is None
    assert G.gguf_refusal(tiny_cfg(moe=True).with_(moe=MoEConfig(d_model=64, d_expert=64, num_experts=4, top_k=1))) is None


def test_existing_file_needs_overwrite_and_failure_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    model = random_model(tiny_cfg())
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(CheckpointError, match="overwrite"):
        export(model, tmp_path, tokenizer)
    assert out.read_bytes() == b"old"

    def broken(*args):
        raise CheckpointError("simulated read-back failure")

    monkeypatch.setattr(G, "check_gguf", broken)
    with pytest.raises(CheckpointError, match="simulated"):
        export(model, tmp_path, tokenizer, overwrite=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    export(model, tmp_path, tokenizer, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_bad_arguments_are_one_line_errors(tmp_path, tokenizer):
    model = random_model(tiny_cfg())
    with pytest.raises(ConfigError, match="q4_k"):
        export(model, tmp_path, tokenizer, "q4_k")
    with pytest.raises(ConfigError, match="tokenizer"):
        G.export_gguf(model, tmp_path / "m.gguf", tokenizer_path=None)
    with pytest.raises(CheckpointError, match="is a folder"):
        G.export_gguf(model, tmp_path, tokenizer_path=tokenizer)
    small = random_model(tiny_cfg(vocab_size=280))
    with pytest.raises(ConfigError, match="vocab_size=280"):
        export(small, tmp_path, tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_tokenizer_llama_cpp_would_split_differently(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "t.json"))
    with pytest.raises(ConfigError, match="WordLevel"):
        G.gguf_vocab(tmp_path / "t.json", V)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d["model"].update(ignore_merges=True), "ignore_merges"),
    (lambda d: d["model"].update(continuing_subword_prefix="##"), "continuing_subword_prefix"),
    (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda d: d.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}), "pre-tokenizer"),
])
def test_refuses_bpe_options_llama_cpp_does_not_apply(tmp_path, tokenizer, edit, needle):
    import json

    d = json.loads(tokenizer.read_text(encoding="utf-8"))
    edit(d)
    (tmp_path / "t.json").write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ConfigError, match=needle):
        G.gguf_vocab(tmp_path / "t.json", V)


# ---------------------------------------------------------------------------------------
# 3. llama.cpp itself

# float32 KV cache throughout: llama.cpp's default f16 cache alone moves these logits by
# 2e-2. f32 file, float32 model: the kernels sum in another order, so the difference is
# float32 rounding (measured 1.9e-5 on logits of std 2.4; 2.3e-4 for the tied model, whose
# head is the std-1 embedding). f16 / bf16 / q8_0: the weights' rounding (q8_0 also has
# llama.cpp quantise the activations to q8_0 for its dot products); measured 1.6e-3,
# 1.3e-2, 4.3e-2 on logits of std 0.8. Those use weights of std 0.1: at 0.3 each d=64
# matmul amplifies ~2.4x, the layers are chaotic, and one routing flip moves logits by a
# whole unit -- a test of the random model, not of the file.
ATOL = {"f32": 1e-4, "f16": 1e-2, "bf16": 6e-2, "q8_0": 0.15}
KINDS = {
    "moe": lambda: tiny_cfg(),
    "dense": lambda: tiny_cfg(moe=False),
    "tied_mha": lambda: tiny_cfg(n_kv_heads=None, tie_embeddings=True),
    "hd64_top1": lambda: tiny_cfg(n_heads=1, n_kv_heads=1).with_(
        moe=MoEConfig(d_model=64, d_expert=64, num_experts=8, top_k=1)),
}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp with cmake)"
    )


def _llama(llama_cpp, path, **kw):
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, type_k=f32, type_v=f32,
                           verbose=False, **kw)


@pytest.mark.parametrize(("file_type", "kind", "wstd"), [
    *(("f32", kind, 0.3) for kind in KINDS),
    *((t, "moe", 0.1) for t in ("f16", "bf16", "q8_0")),
])
def test_llama_cpp_logits_match_ours(tmp_path, tokenizer, llama_cpp, file_type, kind, wstd):
    model = random_model(KINDS[kind](), seed=2, std=wstd)
    res = export(model, tmp_path, tokenizer, file_type)
    ids = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits[0].numpy()
    llm = _llama(llama_cpp, res.path, logits_all=True)
    assert llm.n_vocab() == V
    llm.eval(ids[0].tolist())
    theirs = np.array(llm.scores[: ids.shape[1]], dtype=np.float32)
    diff = float(np.abs(theirs - ours).max())
    print(f"llama.cpp {kind} {file_type}: logits max abs diff {diff:.3g} (logit std {float(ours.std()):.3g})")
    assert diff < ATOL[file_type] * (10 if kind == "tied_mha" else 1)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def _rounded_as_in(model, file_type: str):
    """A copy of `model` whose matrices hold what a `file_type` GGUF stores (the ``gguf``
    package's own quantise -> dequantise, blocks along each matrix's last dim, as the
    file's rows run; norms and routers stay float32)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() < 2 or "norm" in name or "router" in name:
                continue
            ggml = gguf.GGMLQuantizationType["Q8_0" if name == "lm_head.weight" else file_type.upper()]
            rows = p.detach().reshape(-1, p.shape[-1]).numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, ggml), ggml)).reshape(p.shape))
    return out


def test_llama_cpp_on_a_q4_0_file_computes_our_model_on_its_weights(tmp_path, tokenizer, llama_cpp):
    """q4_0 rounds random weights too coarsely to compare with the float model (argmaxes
    flip: logits off by 0.6 at std 0.8); against our model holding the file's own rounded
    weights, what is left is llama.cpp's q8_0 activations, as for a q8_0 file."""
    model = random_model(KINDS["moe"](), seed=2, std=0.1)
    res = export(model, tmp_path, tokenizer, "q4_0")
    assert res.types == {"f32": 7, "q4_0": 15, "q8_0": 1}  # norms and routers; every other matrix; the LM head
    ids = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = _rounded_as_in(model, "q4_0")(ids).logits[0].numpy()
    llm = _llama(llama_cpp, res.path, logits_all=True)
    llm.eval(ids[0].tolist())
    theirs = np.array(llm.scores[: ids.shape[1]], dtype=np.float32)
    diff = float(np.abs(theirs - ours).max())
    print(f"llama.cpp moe q4_0 vs our model on the file's weights: logits max abs diff {diff:.3g}")
    assert diff < ATOL["q8_0"]
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_llama_cpp_greedy_generation_matches_ours(tmp_path, tokenizer, llama_cpp):
    from moelab.infer.generate import generate

    model = random_model(tiny_cfg(), seed=3)
    res = export(model, tmp_path, tokenizer, "f32")
    prompt = [5, 17, 42, 99, 7]
    ours = generate(model, [prompt], max_new_tokens=16).token_ids[0]
    llm = _llama(llama_cpp, res.path)
    theirs = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(int(tok))
        if len(theirs) == 16:
            break
    assert theirs == ours


def test_llama_cpp_tokenizes_like_ours(tmp_path, tokenizer, llama_cpp):
    from tokenizers import Tokenizer

    res = export(random_model(tiny_cfg()), tmp_path, tokenizer, "q8_0")
    llm = llama_cpp.Llama(model_path=str(res.path), n_ctx=64, vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(str(tokenizer))
    for text in ["the quick brown fox", "def f(x):\n    return x + 1\n", "lazy dogs  jump, again!"]:
        ids = tok.encode(text).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == text
