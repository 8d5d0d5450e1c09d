"""`AllToAllDispatcher`: the `Dispatcher` protocol with the routed experts spread over the
ranks of an ep group.

Legend: T tokens (this rank's), D model dim, E experts, K experts per token, R ranks of
the ep group, L = E / R experts per rank, A kept (token, expert) assignments of this
rank, B rows this rank's experts receive.

One MoE layer, on every rank (torchtitan's ``AllToAllTokenDispatcher`` and Megatron's
``MoEAlltoAllTokenDispatcher`` follow the same plan):

1. *Batch statistics* (over ``batch_group``, normally every rank): one ``all_reduce`` of
   the routed counts per expert and the token count, so the balance loss, the z-loss and
   telemetry are those of the global batch; with ``capacity_factor`` an ``all_gather``
   of the routing itself, so that each expert's capacity and drops are decided over the
   global batch exactly as one process decides them over the concatenated batch.
2. *Count exchange*: ``all_to_all_single`` of the rows per expert ``[E]``; each rank learns
   ``counts_RL``, how many rows every rank sends to each of its experts.
3. One host sync: the send and receive splits per rank and the global token count, as
   Python ints (with ``capacity_factor`` one more, before it: the capacity is an int).
4. *Token exchange* through `AllToAll`, moelab's autograd Function (its backward is the
   same exchange with the splits swapped); rows arrive rank-major and are permuted to
   expert-major (`moelab.dist.permute`).
5. The local experts backend on ``[B, D]`` with ``L`` counts.
6. The reverse: un-permute, exchange back, multiply by the combine weight at the origin
   (so weights never travel), scatter-add per token (in fp32 under autocast, then cast).
   With ``weight_on_input`` (Llama 4) the weight scales the row before it leaves instead.

Every collective is called on every rank for every layer, with zero rows as well: a rank
that routes nothing to (or receives nothing from) a peer still takes part, so no rank
waits on a collective another skipped.

Under `torch.compile` (``generate(compile=True)``'s decode step, one graph with
``fullgraph=True``) the exchange cannot be traced: its splits are host ints and the
collectives take a process group. `dispatch` then defers it (`DeferredExchange`) and
`run_experts` runs steps 1-6 eagerly inside one opaque op, ``moelab::ep_routed_experts``
(as `moelab.moe.ops` does for the local experts' GEMMs); the op finds its dispatcher and
experts by a key registered when `moelab.dist.parallel.shard_experts` built them. Only
the output exists there: no telemetry or routing record (the compiled decode asks for
neither), no autograd (inference only).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelab.dist.permute import expert_major_order, inverse_permutation
from moelab.errors import ConfigError
from moelab.moe import routing
from moelab.moe.dispatch import (
    Dispatched,
    assignments_token_choice,
    count_per_expert,
    gather_tokens,
    sum_rows_per_token,
)
from moelab.moe.experts import RoutedExperts
from moelab.moe.losses import load_balancing_loss, router_z_loss
from moelab.moe.router import RouterOutput


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows; backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty(sum(out_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g_MD):
        out_splits, in_splits = ctx.splits
        g_ND = g_MD.new_empty(sum(in_splits), *g_MD.shape[1:])
        dist.all_to_all_single(g_ND, g_MD.contiguous(), in_splits, out_splits, group=ctx.group)
        return g_ND, None, None, None


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return AllToAll.apply(x_ND, out_splits, in_splits, group)


@dataclass
class DeferredExchange:
    """What `dispatch` returns under `torch.compile`: the exchange runs in `run_experts`."""

    x_TD: torch.Tensor
    expert_idx_TK: torch.Tensor
    weights_TK: torch.Tensor


# key -> (dispatcher, its layer's local experts), weakly: the op's eager body looks them up
# (a process group and a module cannot be op arguments). Filled by `register_for_compile`.
_LAYERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def register_for_compile(dispatcher: AllToAllDispatcher, experts: RoutedExperts) -> None:
    _LAYERS[id(dispatcher)] = (weakref.ref(dispatcher), weakref.ref(experts))


@torch.library.custom_op("moelab::ep_routed_experts", mutates_args=())
def ep_routed_experts(x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor,
                      layer: int) -> torch.Tensor:
    """Dispatch, the local experts and the combine of one layer, eagerly (module docstring)."""
    refs = _LAYERS.get(layer)
    dispatcher, experts = (refs[0](), refs[1]()) if refs else (None, None)
    if dispatcher is None or experts is None:
        raise RuntimeError("moelab::ep_routed_experts: this layer's dispatcher is gone (build it with shard_experts)")
    empty_TE = x_TD.new_empty(x_TD.shape[0], 0)
    route = RouterOutput(logits_TE=empty_TE, probs_TE=empty_TE, expert_idx_TK=expert_idx_TK, weights_TK=weights_TK)
    return dispatcher.run_experts(experts, dispatcher.exchange(x_TD, route))


@ep_routed_experts.register_fake
def _(x_TD, expert_idx_TK, weights_TK, layer):
    return torch.empty_like(x_TD)


@dataclass
class ExpertParallelDispatched(Dispatched):
    """`Dispatched` plus the exchange's state. ``tokens_per_expert_E`` (telemetry, the bias
    update) counts the *global* batch's kept rows per expert over all E experts; the local
    experts' row counts are ``local_counts_L``."""

    local_counts_L: torch.Tensor | None = None  # rows per local expert, expert-major
    send_splits: list[int] | None = None  # rows to each rank of the ep group
    recv_splits: list[int] | None = None  # rows from each rank
    perm_B: torch.Tensor | None = None  # rank-major index of each expert-major received row
    routed_counts_E: torch.Tensor | None = None  # global routed (pre-drop) assignments per expert: f of the balance loss


class AllToAllDispatcher:
    """The experts of this rank are ``[ep_rank * L, (ep_rank + 1) * L)``; see the module
    docstring. ``batch_group``: the ranks whose tokens form one batch for the losses,
    capacity and telemetry (training: every rank); None: each rank's own tokens are the
    batch (inference on replicated prompts, where each rank must act like one process)."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None, drop_policy: str, *,
                 ep_group, batch_group=None, weight_on_input: bool = False):
        self.num_experts, self.top_k = num_experts, top_k
        # Llama 4 (`MoEConfig.weight_on_input`): ``expert_e(w x)``, so the weight scales each
        # row at the origin before it travels, and the combine only sums.
        self.weight_on_input = weight_on_input
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.ep_group, self.batch_group = ep_group, batch_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise ConfigError(f"--ep {self.ep_size}: num_experts={num_experts} is not divisible by the EP size")
        self.local_experts = num_experts // self.ep_size

    # ------------------------------------------------------------------ dispatch

    def _global_keep(self, route: RouterOutput, T_global: int, sizes: list[int]) -> tuple:
        """The capacity decision over the batch group's concatenated routing; returns this
        rank's ``keep_TK`` and the global kept / dropped counts."""
        E, K = self.num_experts, self.top_k
        idx_TK, w_TK = route.expert_idx_TK, route.weights_TK.detach().float()
        if self.batch_group is None:
            idx_all, w_all, offset = idx_TK, w_TK, 0
        else:
            T_max = max(sizes)
            pad = T_max - idx_TK.shape[0]
            idx_p = torch.nn.functional.pad(idx_TK, (0, 0, 0, pad))
            w_p = torch.nn.functional.pad(w_TK, (0, 0, 0, pad))
            n = len(sizes)
            idx_list = [torch.empty_like(idx_p) for _ in range(n)]
            w_list = [torch.empty_like(w_p) for _ in range(n)]
            dist.all_gather(idx_list, idx_p, group=self.batch_group)
            dist.all_gather(w_list, w_p, group=self.batch_group)
            idx_all = torch.cat([t[:s] for t, s in zip(idx_list, sizes, strict=True)])
            w_all = torch.cat([t[:s] for t, s in zip(w_list, sizes, strict=True)])
            offset = sum(sizes[: dist.get_rank(self.batch_group)])
        capacity = routing.expert_capacity(T_global, E, K, self.capacity_factor)
        keep_all = routing.capacity_keep_mask(idx_all, w_all, E, capacity, self.drop_policy)
        kept_E = count_per_expert(idx_all[keep_all], E)
        keep_TK = keep_all[offset: offset + idx_TK.shape[0]]
        return keep_TK, kept_E, (~keep_all).sum()

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> ExpertParallelDispatched | DeferredExchange:
        if route.is_expert_choice:
            raise ConfigError("MoEConfig.router='expert_choice' is not supported with expert parallelism "
                              "(its choice spans every token of the batch); use a token-choice router")
        if torch.compiler.is_compiling():
            return DeferredExchange(x_TD, route.expert_idx_TK, route.weights_TK)
        return self.exchange(x_TD, route)

    def exchange(self, x_TD: torch.Tensor, route: RouterOutput) -> ExpertParallelDispatched:
        """Steps 1-4 of the module docstring (eager)."""
        T, E, R, L = x_TD.shape[0], self.num_experts, self.ep_size, self.local_experts
        routed_E = count_per_expert(route.expert_idx_TK.reshape(-1), E)
        # 1. batch statistics: routed counts per expert and tokens, summed over the batch group.
        stats = torch.cat([routed_E, routed_E.new_tensor([T])])
        sizes = [T]
        if self.batch_group is not None:
            n = dist.get_world_size(self.batch_group)
            if self.capacity_factor is not None:  # every rank's T, for the gather's padding
                each = [torch.empty_like(stats) for _ in range(n)]
                dist.all_gather(each, stats, group=self.batch_group)
                stats = torch.stack(each).sum(0)
                sizes = [int(t[-1]) for t in each]
            else:
                dist.all_reduce(stats, group=self.batch_group)
        routed_global_E = stats[:E]
        keep_TK, dropped = None, None
        kept_global_E = routed_global_E
        if self.capacity_factor is not None:  # the capacity is a Python int: one more host sync here
            keep_TK, kept_global_E, dropped = self._global_keep(route, sum(sizes), sizes)
        token_A, expert_A, weight_A = assignments_token_choice(route.expert_idx_TK, route.weights_TK, keep_TK)
        order_A = torch.argsort(expert_A, stable=True)  # by expert = by destination rank, then by token
        token_A, weight_A = token_A[order_A], weight_A[order_A]
        send_E = count_per_expert(expert_A, E)
        # 2. count exchange: recv_RL[r, l] rows from rank r for local expert l.
        recv_E = torch.empty_like(send_E)
        dist.all_to_all_single(recv_E, send_E, group=self.ep_group)
        counts_RL = recv_E.view(R, L)
        # 3. the one host sync (dropless): both splits and the global token count at once.
        splits = torch.cat([send_E.view(R, L).sum(1), counts_RL.sum(1), stats[E:]]).tolist()
        send_splits, recv_splits, T_global = splits[:R], splits[R:2 * R], splits[2 * R]
        # 4. token exchange, then rank-major -> expert-major.
        x_AD = gather_tokens(x_TD, token_A)
        if self.weight_on_input:
            x_AD = x_AD * weight_A.to(x_AD.dtype).unsqueeze(-1)
        x_recv_BD = all_to_all(x_AD, recv_splits, send_splits, self.ep_group)
        perm_B = expert_major_order(counts_RL, total=sum(recv_splits))
        d = ExpertParallelDispatched(
            x_TD, kept_global_E, weight_A, token_A, T, dropped, keep_TK,
            batch_tokens=T_global if self.batch_group is not None else None,
            local_counts_L=counts_RL.sum(0), send_splits=send_splits, recv_splits=recv_splits, perm_B=perm_B,
            routed_counts_E=routed_global_E,
        )
        d._x_AD = x_recv_BD[perm_B]
        return d

    # ------------------------------------------------------------------ combine

    def combine(self, y_BD: torch.Tensor, dispatched: ExpertParallelDispatched) -> torch.Tensor:
        """The local experts' rows (expert-major, unweighted) back to this rank's tokens."""
        d = dispatched
        y_recv_BD = y_BD[inverse_permutation(d.perm_B)]
        y_AD = all_to_all(y_recv_BD, d.send_splits, d.recv_splits, self.ep_group)
        acc = torch.promote_types(y_AD.dtype, torch.float32)  # sum a token's K rows in fp32 at least
        y_AD = y_AD.to(acc) if self.weight_on_input else y_AD.to(acc) * d.weight_A.to(acc).unsqueeze(-1)
        return sum_rows_per_token(y_AD, d.token_idx_A, d.num_tokens).to(d.x_TD.dtype)

    def run_experts(self, experts: RoutedExperts,
                    dispatched: ExpertParallelDispatched | DeferredExchange) -> torch.Tensor:
        d = dispatched
        if isinstance(d, DeferredExchange):  # traced: the whole exchange is one opaque op
            if id(self) not in _LAYERS:
                raise ConfigError("torch.compile over EP needs the dispatcher built by moelab.dist.shard_experts")
            return torch.ops.moelab.ep_routed_experts(d.x_TD, d.expert_idx_TK, d.weights_TK, id(self))
        if experts.num_experts != self.local_experts:
            raise ConfigError(f"the layer holds {experts.num_experts} experts but EP size {self.ep_size} gives "
                              f"{self.local_experts} per rank: shard the model with moelab.dist.shard_experts")
        x_BD = d.x_AD
        ones_B = x_BD.new_ones(x_BD.shape[0])  # the combine weight is applied at the origin
        y_BD = experts(x_BD, d.local_counts_L, ones_B)
        if x_BD.shape[0] == 0:
            # No row for this rank's experts: the backend's empty output does not depend on
            # the received rows, so autograd would skip this rank's backward of the token
            # exchange while the peers run theirs -- a collective mismatch (found by the
            # idle-rank test). Tie the output to the input so every rank takes part.
            y_BD = y_BD + x_BD.sum() * 0.0
        return self.combine(y_BD, d)

    # ------------------------------------------------------------------ losses

    def losses(self, route: RouterOutput, dispatched: ExpertParallelDispatched,
               seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shares of the global batch's balance and z losses (module docstring):
        ``E * sum_e f_e * P_e`` with f over every rank's routing and ``P_e`` summed over this
        rank's tokens divided by the global token count; the shares over ranks sum to the
        single-process loss of the concatenated batch, and so do their gradients once the
        replicated parameters' gradients are summed."""
        d = dispatched
        if d.batch_tokens is None:
            aux = load_balancing_loss(route.probs_TE, route.expert_idx_TK, self.num_experts, seq_len=seq_len)
            return aux, router_z_loss(route.logits_TE)
        T, T_g, K = route.num_tokens, d.batch_tokens, self.top_k
        probs_TE, logits_TE = route.probs_TE, route.logits_TE
        if T_g == 0:
            return probs_TE.sum() * 0.0, logits_TE.float().sum() * 0.0
        if seq_len is None:
            f_E = d.routed_counts_E.to(probs_TE.dtype) / (T_g * K)
            aux = self.num_experts * (f_E * probs_TE.sum(0)).sum() / T_g
        else:  # per-sequence loss: sequences are whole on one rank, only their number is global
            aux = load_balancing_loss(probs_TE, route.expert_idx_TK, self.num_experts, seq_len=seq_len) * (T / T_g)
        z = torch.logsumexp(logits_TE.float(), dim=-1).square().sum() / T_g
        return aux, z
