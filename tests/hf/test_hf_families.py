"""Import parity for the families beyond the first four: DeepSeek-V2 / V3 (and Kimi K2),
gpt-oss. Each tiny random model is saved with save_pretrained, imported, and its fp32
logits compared with transformers' own forward; then generate and routing analysis run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from moelab.errors import ConfigError
from moelab.hf import load_hf

transformers = pytest.importorskip("transformers")
T = transformers

V = 96
_BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 10000.0})
MLA = dict(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, intermediate_size=48,
           moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1)


def family_config(name: str):
    BASE = copy.deepcopy(_BASE)  # config classes edit rope_parameters in place (GLM adds its factor)
    if name == "deepseek_v3":
        return T.DeepseekV3Config(**BASE, **MLA, q_lora_rank=12, n_shared_experts=1, n_group=4, topk_group=2,
                                  routed_scaling_factor=2.5, norm_topk_prob=True)
    if name == "deepseek_v3-no-q-lora-not-interleaved":
        return T.DeepseekV3Config(**BASE, **MLA, q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1,
                                  rope_interleave=False, norm_topk_prob=False, attention_bias=True)
    if name == "deepseek_v2":
        return T.DeepseekV2Config(**BASE, **MLA, q_lora_rank=None, n_shared_experts=2, routed_scaling_factor=1.5)
    if name == "deepseek_v2-group-limited":
        return T.DeepseekV2Config(**BASE, **MLA, q_lora_rank=12, n_shared_experts=1, topk_method="group_limited_greedy",
                                  n_group=4, topk_group=2, routed_scaling_factor=16.0)
    if name == "gpt_oss":
        return T.GptOssConfig(**dict(BASE, num_hidden_layers=4), intermediate_size=16, num_key_value_heads=2,
                              head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    if name == "deepseek_v3-yarn":  # Kimi K2 / DeepSeek-V3's published rope: YaRN with mscale
        BASE["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 32,
                                   "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                   "original_max_position_embeddings": 16}
        return T.DeepseekV3Config(**BASE, **MLA, q_lora_rank=12, n_shared_experts=1, n_group=4, topk_group=2)
    if name == "gpt_oss-yarn":  # the class default: YaRN factor 32 over 4096, truncate=False
        del BASE["rope_parameters"]
        return T.GptOssConfig(**dict(BASE, num_hidden_layers=2), intermediate_size=16, num_key_value_heads=2,
                              head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    if name == "glm4_moe":
        return T.Glm4MoeConfig(**BASE, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2,
                               head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
                               topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.8, attention_bias=True,
                               use_qk_norm=True)
    if name == "dots1":
        return T.Dots1Config(**BASE, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2,
                             head_dim=8, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, n_group=2,
                             topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, attention_bias=True,
                             sliding_window=6, max_window_layers=1)
    if name in ("granitemoe", "granitemoeshared"):
        cls = T.GraniteMoeSharedConfig if name == "granitemoeshared" else T.GraniteMoeConfig
        extra = dict(shared_intermediate_size=24) if name == "granitemoeshared" else {}
        return cls(**BASE, intermediate_size=16, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                   attention_bias=True, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                   logits_scaling=4.0, **extra)
    if name == "ernie4_5_moe":
        return T.Ernie4_5_MoeConfig(**dict(BASE, num_hidden_layers=4, pad_token_id=None), intermediate_size=48,
                                    num_key_value_heads=2, moe_intermediate_size=16, moe_num_experts=8, moe_k=3,
                                    moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
                                    tie_word_embeddings=False)
    if name == "hunyuan_v1_moe":
        return T.HunYuanMoEV1Config(**BASE, intermediate_size=24, num_key_value_heads=2, head_dim=8, num_experts=4,
                                    moe_topk=2, attention_bias=True)
    if name == "llama4_text":
        return T.Llama4TextConfig(**dict(BASE, num_hidden_layers=4), intermediate_size=16, intermediate_size_mlp=48,
                                  num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                  interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=64)
    raise ValueError(name)


FAMILIES = ["deepseek_v3", "deepseek_v3-no-q-lora-not-interleaved", "deepseek_v2", "deepseek_v2-group-limited",
            "gpt_oss", "glm4_moe", "llama4_text", "dots1", "granitemoe", "granitemoeshared", "deepseek_v3-yarn",
            "gpt_oss-yarn", "ernie4_5_moe", "hunyuan_v1_moe"]


def random_model(name: str, seed: int = 0):
    """Weights large enough that routing and logits vary (the default init hides mistakes)."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(family_config(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif pname.endswith(("norm.weight", "layernorm.weight")):
                p.normal_(1, 0.2)
            else:  # biases, sinks
                p.normal_(0, 0.5)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)  # the selection-only bias must change which experts win
    return model


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            model = random_model(name)
            out = tmp_path_factory.mktemp(name.replace("-", "_"))
            model.save_pretrained(out)
            cache[name] = (model, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_logit_parity_with_transformers(saved, name):
    hf_model, folder = saved(name)
    imp = load_hf(folder)
    ids = _ids()
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = imp.model(ids).logits
    assert ref.abs().max() > 1.0  # logits far from zero: the check has teeth
    diff = (ref - got).abs().max().item()
    print(f"{name}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2", "gpt_oss", "glm4_moe", "llama4_text",
                                  "gpt_oss-yarn", "ernie4_5_moe", "hunyuan_v1_moe"])
def test_cached_decode_equals_full_forward(saved, name):
    """Prefill + one token at a time through the KV cache (MLA: value dim != key dim;
    gpt-oss: sinks and a sliding window shorter than the sequence) gives the full logits."""
    from moelab.model.cache import KVCache

    _, folder = saved(name)
    model, cfg = load_hf(folder).model, load_hf(folder).config
    ids = _ids(1, (1, 12))
    cache = KVCache(n_layers=cfg.n_layers, batch_size=1, max_len=16, n_kv_heads=cfg.kv_heads,
                    head_dim=cfg.dim_head, v_head_dim=cfg.value_dim)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_imported_features(saved):
    cfg = load_hf(saved("deepseek_v3")[1]).config
    assert cfg.attention == "mla" and cfg.first_dense_layers == 1 and cfg.moe_layers == [1, 2]
    m = cfg.moe
    assert (m.router, m.n_group, m.topk_group, m.routed_scaling_factor, m.num_shared_experts) == ("sigmoid", 4, 2, 2.5, 1)
    model = load_hf(saved("deepseek_v3")[1]).model
    assert model.layers[1].mlp.router.expert_bias.abs().sum() > 0  # e_score_correction_bias loaded
    m = load_hf(saved("deepseek_v2-group-limited")[1]).config.moe
    assert (m.router, m.n_group, m.norm_topk_prob, m.routed_scaling_factor) == ("softmax", 4, False, 16.0)
    cfg = load_hf(saved("gpt_oss")[1]).config
    assert cfg.attn_sinks and cfg.sliding_layers == (0, 2) and cfg.sliding_window == 4
    assert cfg.moe.activation == "swiglu_oai" and cfg.moe.router_bias and cfg.moe.expert_proj_bias
    cfg = load_hf(saved("glm4_moe")[1]).config
    assert cfg.rotary_dim == 6 and cfg.qk_norm == "head" and cfg.attn_bias and cfg.first_dense_layers == 1
    assert (cfg.moe.router, cfg.moe.n_group, cfg.moe.num_shared_experts) == ("sigmoid", 2, 1)
    from moelab.model import ModelConfig

    cfg = load_hf(saved("deepseek_v3-yarn")[1]).config
    assert cfg.rope_yarn.factor == 8.0 and abs(cfg.attn_scale - (0.1 * math.log(8) + 1) ** 2 / 12**0.5) < 1e-12
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # a run dir round-trips it
    cfg = load_hf(saved("gpt_oss-yarn")[1]).config
    assert cfg.rope_yarn.attention_factor == pytest.approx(0.1 * math.log(32) + 1) and not cfg.rope_yarn.truncate
    model = load_hf(saved("ernie4_5_moe")[1]).model
    assert model.cfg.moe_layers == [1, 2, 3] and model.cfg.moe.selection_bias and model.cfg.rope_interleave
    assert model.layers[1].mlp.router.expert_bias.abs().sum() > 0  # moe_statics loaded
    cfg = load_hf(saved("dots1")[1]).config
    assert cfg.sliding_layers == (1, 2) and cfg.o_bias and cfg.qk_norm == "head" and cfg.moe.num_shared_experts == 2
    cfg = load_hf(saved("llama4_text")[1]).config
    assert cfg.moe_layers == [1, 3] and cfg.nope_layers == (1, 3) and cfg.qk_norm == "l2"
    assert cfg.moe.weight_on_input and cfg.d_ff == 48 and cfg.max_seq_len == 64  # capped at the chunk size


def test_kimi_k2_config_is_deepseek_v3(saved, tmp_path):
    hf_model, folder = saved("deepseek_v3")
    d = json.loads((folder / "config.json").read_text())
    d["model_type"] = "kimi_k2"
    out = tmp_path / "kimi"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(d))
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    imp = load_hf(out)
    ids = _ids()
    with torch.no_grad():
        assert (hf_model(ids).logits - imp.model(ids).logits).abs().max() <= 1e-4
    assert imp.family == "kimi_k2"


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss"])
def test_generate_and_routing_record(saved, name):
    from moelab.infer.generate import generate

    _, folder = saved(name)
    model = load_hf(folder).model
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=0.0, record_routing=True)
    assert all(len(ids) == 4 for ids in out.token_ids)
    assert out.routing is not None and len(out.routing[0]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_oss", "llama4_text"])
def test_compiled_generate_of_reference_only_experts(saved, name):
    """gpt-oss (biases, clamped GLU, sinks) and Llama 4 (routing weight on the input) take
    the readable loop eagerly; compiled, a few rows are traced per row
    (`experts._traced_reference`): the eager greedy tokens at batch 1 and 2. A batch with
    more rows than that is refused by name, not with a tracing error."""
    from moelab.infer.generate import generate
    from moelab.moe import traced

    _, folder = saved(name)
    model = load_hf(folder).model
    for prompts in ([[1, 2, 3]], [[1, 2, 3], [4, 5]]):
        assert generate(model, prompts, max_new_tokens=6, compile=True).token_ids == \
            generate(model, prompts, max_new_tokens=6).token_ids
    too_many = [[1, 2]] * (traced.TRACED_MAX_ROWS // model.cfg.moe.top_k + 1)
    with pytest.raises(ConfigError, match="compile=True runs these experts .* traced, for at most"):
        generate(model, too_many, max_new_tokens=2, compile=True)


@pytest.mark.parametrize("field,value,message", [
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "RoPE scaling 'dynamic'"),
    ("topk_method", "noaux_tc", "field 'topk_method'='noaux_tc' is not supported"),
    ("mlp_bias", True, "field 'mlp_bias'=True is not supported"),
    ("quantization_config", {"quant_method": "mxfp4"}, "'quantization_config' \\(quant_method 'mxfp4'\\)"),
])
def test_unsupported_option_is_refused_by_name(saved, tmp_path, field, value, message):
    _, folder = saved("deepseek_v2")
    d = json.loads((folder / "config.json").read_text())
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=message):
        load_hf(tmp_path)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2", "gpt_oss", "glm4_moe", "llama4_text", "dots1",
                                  "granitemoe", "granitemoeshared", "ernie4_5_moe", "hunyuan_v1_moe"])
def test_export_refuses_import_only_families(saved, tmp_path, name):
    """Export to HF and to GGUF refuse by name what the exported families cannot hold
    (Granite's multipliers would otherwise pass as a plain Mixtral)."""
    from moelab.hf.export import export_hf
    from moelab.hf.gguf import gguf_refusal

    cfg = load_hf(saved(name)[1]).config
    with pytest.raises(ConfigError, match="cannot export to Hugging Face format: (ModelConfig|MoEConfig)"):
        export_hf(load_hf(saved(name)[1]).model, tmp_path / name)
    assert gguf_refusal(cfg) is not None


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss"])
def test_serving_mla_and_sinks_matches_generate(saved, name):
    """The serving engine's slot cache holds MLA's narrower value heads, and its packed
    batch runs gpt-oss's sink attention (sliding and full layers): its batches give
    `generate`'s tokens."""
    from moelab.infer.generate import generate
    from moelab.serve.engine import Engine, EngineConfig, run_to_completion
    from moelab.serve.types import GenerationRequest

    model = load_hf(saved(name)[1]).model
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    engine = Engine(model, EngineConfig(max_num_seqs=3, max_batch_tokens=8, max_len=64))
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=5) for p in prompts]
    events = run_to_completion(engine, reqs)
    for r, p in zip(reqs, prompts, strict=True):
        got = [t for e in events[r.request_id] for t in e.token_ids]
        assert got == generate(model, [p], max_new_tokens=5, temperature=0.0).token_ids[0]


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2", "gpt_oss", "glm4_moe", "llama4_text", "dots1",
                                  "granitemoeshared", "ernie4_5_moe"])
def test_specialisation_analysis_runs(saved, tmp_path, name):
    """`moelab analyze`'s core on the imported model: routing record, statistics, heatmaps."""
    import numpy as np

    from moelab.lab.specialization.analysis import write_analysis
    from moelab.lab.specialization.stats import AnalysisConfig, analyze_model

    model = load_hf(saved(name)[1]).model
    rng = np.random.default_rng(0)
    tokens = {"code": rng.integers(0, V // 2, 512), "prose": rng.integers(V // 2, V, 512)}
    res = analyze_model(model, tokens, config=AnalysisConfig(tokens_per_domain=256, seq_len=32))
    assert [ls.layer for ls in res.layers] == model.cfg.moe_layers
    written = write_analysis(res, tmp_path)
    assert all((tmp_path / f).is_file() for f in written.files.values())


@pytest.mark.parametrize("name", ["gpt_oss", "llama4_text"])
def test_quantize_refuses_reference_only_experts(saved, name):
    from moelab.quant.quantize import quantize_model

    with pytest.raises(ConfigError, match="no quantised kernel"):
        quantize_model(load_hf(saved(name)[1]).model, "int8")


@pytest.mark.parametrize("name", ["deepseek_v3-yarn", "gpt_oss", "llama4_text"])
def test_generate_cli_on_the_folder_and_its_moelab_run(saved, tmp_path, capsys, name):
    """`moelab generate` on the HF folder, and on the moelab run dir it converts to (the new
    config fields survive the run dir's config.json), print the same greedy text."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from moelab.cli.main import main
    from moelab.hf import save_moelab

    folder = tmp_path / "hf"
    shutil.copytree(saved(name)[1], folder)
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    imp = load_hf(folder)
    save_moelab(imp.model, tmp_path / "run", tokenizer_path=imp.tokenizer_path)
    outs = []
    for path in (folder, tmp_path / "run"):
        assert main(["generate", str(path), "--prompt", "w5 w9 w17", "--max-new-tokens", "5"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("w5 w9 w17")
