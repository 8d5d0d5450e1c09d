"""Worker for the multi-process parity tests (run by `moelab.dist.launch`, one per rank).

``python ep_worker.py OUT_DIR CASE [CASE ...]``: for each case, build the case's model and
global batch (`build_case`, shared with the single-process side of the test), shard its
experts over the ep group, run forward and backward on this rank's rows, reduce the
gradients, and save outputs, losses and gradients to ``OUT_DIR/CASE.rankR.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig

CASES: dict[str, dict] = {
    "softmax": {},
    "softmax_capacity": {"capacity_factor": 1.0},
    "softmax_capacity_position": {"capacity_factor": 0.75, "drop_policy": "position"},
    "sigmoid_groups": {"router": "sigmoid", "n_group": 2, "topk_group": 1},
    "sigmoid_groups_capacity": {"router": "sigmoid", "n_group": 2, "topk_group": 1, "capacity_factor": 1.0},
    "seq_aux": {"seq_aux_loss": True},
    # The sigmoid router's selection bias keeps every token off experts 2 and 3: rank 1's
    # experts receive no row, and every rank sends none to rank 1.
    "rank1_idle": {"router": "sigmoid", "_bias": [0.0, 0.0, -100.0, -100.0]},
    # Ranks with different numbers of rows (1 and 3 of the 4): the capacity path pads the
    # routing it gathers.
    "softmax_capacity_uneven": {"capacity_factor": 1.0, "_split": [1, 3]},
    # The families merged from main: Llama 4's weight on the expert input; gpt-oss's
    # biased experts with the clamped GLU and a router bias; ERNIE's selection bias.
    "weight_on_input": {"weight_on_input": True},
    "gpt_oss_experts": {"activation": "swiglu_oai", "expert_proj_bias": True, "router_bias": True},
    "softmax_selection_bias_groups": {"selection_bias": True, "n_group": 2, "topk_group": 1},
    # The bar: float32 at 1e-5.
    "softmax_fp32": {"_dtype": "float32"},
    "sigmoid_groups_capacity_fp32": {"router": "sigmoid", "n_group": 2, "topk_group": 1, "capacity_factor": 1.0,
                                     "_dtype": "float32"},
}


def build_case(name: str) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    """(model, input_ids [B, S], targets [B, S]) of a case, identical in every process."""
    over = dict(CASES[name])
    over.pop("_split", None)
    bias = over.pop("_bias", None)
    dtype = getattr(torch, over.pop("_dtype", "float64"))
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001, **over)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16,
                      moe=moe)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    g_bias = torch.Generator().manual_seed(2)
    with torch.no_grad():  # biases start at 0: make them matter
        for n, p in model.named_parameters():
            if n.endswith("_bias") or n.endswith("router.bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g_bias, dtype=torch.float64))
        if moe.selection_bias:
            for m in model.moe_layers:
                m.router.expert_bias.copy_(0.05 * torch.randn(4, generator=g_bias, dtype=torch.float64))
    if bias is not None:
        for m in model.moe_layers:
            m.router.expert_bias.copy_(torch.tensor(bias))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 8), generator=g)
    y = torch.randint(0, 64, (4, 8), generator=g)
    return model, x, y


def run_rank(out_dir: Path, name: str, ctx) -> None:
    import torch.distributed as dist

    from moelab.dist.parallel import reduce_gradients, shard_experts

    model, x, y = build_case(name)
    shard_experts(model, ctx)
    split = CASES[name].get("_split") if ctx.world_size == 2 else None
    if split is None:
        B = x.shape[0] // ctx.world_size
        rows = slice(ctx.rank * B, (ctx.rank + 1) * B)
    else:
        rows = slice(sum(split[:ctx.rank]), sum(split[:ctx.rank + 1]))
    out = model(x[rows], targets=y[rows])
    n_local = (y[rows] != -100).sum()
    n_global = n_local.clone()
    dist.all_reduce(n_global)
    loss = out.lm_loss * (n_local / n_global) + out.moe_loss  # this rank's share of the global loss
    loss.backward()
    reduce_gradients(model, ctx)
    shares = torch.stack([loss.detach(), out.aux_loss.detach(), out.z_loss.detach()])
    dist.all_reduce(shares)
    torch.save({
        "logits": out.logits.detach(), "rows": (rows.start, rows.stop),
        "loss": shares[0], "aux": shares[1], "z": shares[2],
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "tokens_per_expert": {i: s.tokens_per_expert for i, s in out.layer_stats.items()},
        "ep_rank": ctx.ep_rank, "ep_size": ctx.ep_size,
    }, out_dir / f"{name}.rank{ctx.rank}.pt")


PROMPTS = [[1, 5, 9, 2, 7], [3, 3], [60, 12, 8, 40, 41, 42, 1]]  # ragged: left padding


def generation_model() -> Transformer:
    model, _, _ = build_case("softmax")
    return model.float().eval()


def run_generate(out_dir: Path, ctx, *, compile: bool = False) -> None:
    """Greedy generation with the experts over the ep group; every rank gets the prompts.
    ``compile``: the decode steps as one compiled graph (the exchange an opaque op)."""
    from moelab.dist.parallel import shard_experts
    from moelab.infer.generate import generate

    model = shard_experts(generation_model(), ctx, global_batch=False)
    result = generate(model, PROMPTS, max_new_tokens=6, compile=compile)
    name = "generate_compiled" if compile else "generate"
    torch.save({"tokens": result.token_ids, "extras": result.extras}, out_dir / f"{name}.rank{ctx.rank}.pt")


def main() -> None:
    torch.set_num_threads(1)
    from moelab.dist.mesh import init_dist, shutdown

    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    ctx = init_dist(ep=int(__import__("os").environ.get("EP", "2")))
    try:
        for name in names:
            if name in ("generate", "generate_compiled"):
                run_generate(out_dir, ctx, compile=name == "generate_compiled")
            else:
                run_rank(out_dir, name, ctx)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
