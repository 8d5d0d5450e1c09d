"""A decode step of one shape for `torch.compile` (gpt-fast style), used by
``generate(..., compile=True)``.

Legend: B batch rows, S cache length (static), D model dim, V vocab.

The eager decode step attends over ``[:length + 1]`` of the cache, so its shapes change
every step. The compiled step runs the model's own `Transformer.forward` over a
`StaticKVCache` view of the same buffers: it writes the new key/value at a column held in
a tensor and attends over the whole cache with a mask (real prompt tokens and the
columns written so far), so one compiled graph serves every step of a generation.
`decode_one_token` run eagerly is the reference of the compiled path (tests compare it
to the eager dynamic-cache decode).

Which experts run is data dependent: inside the graph many rows' expert GEMMs are an
opaque op that runs eager code on the original weights (`moelab.moe.ops`). A decode step's
few rows, and every one-row linear, are traced instead as fused reductions over the weights
(`moelab.moe.traced`: float experts up to 32 rows, int8 up to 8), and so are one-query
attention (`moelab.model.layers.one_query_attention`), the sort of one token's experts
(`traced.order_of_distinct`), the routers' finiteness check (an assert) and, when greedy,
the argmax. Everything else is inductor's: with freezing (batches of more than one row),
the dense linears (attention, router, LM head) become MKL-packed GEMMs, which at 8 rows run
about twice as fast as ATen's (the [8, 768] x [768, 32000] LM head: 3.2 vs 6.4 ms here),
and the small ops of each layer fuse into a few C++ kernels. See BENCHMARKS.md "## Decode" for what it gains.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
import torch._inductor.config

from moelab.errors import ConfigError
from moelab.model import StaticKVCache, Transformer
from moelab.moe import MoE, NonFiniteRouterError, RoutedExperts, routing, traced

# `set_stance(skip_guard_eval_unsafe=...)` is torch >= 2.6's; older ones run every guard.
_CAN_SKIP_GUARDS = "skip_guard_eval_unsafe" in inspect.signature(
    getattr(torch.compiler, "set_stance", lambda: None)).parameters

# Cache lengths are rounded up to a power of two (at least this) so that prompts of
# similar length share one compiled graph; each new (B, S) compiles again.
MIN_STATIC_LEN = 64


def static_cache_len(needed: int, max_seq_len: int) -> int:
    """The cache length a compiled decode uses for ``needed`` positions."""
    n = MIN_STATIC_LEN
    while n < needed:
        n *= 2
    return max(needed, min(n, max_seq_len))


def check_compilable(model: Transformer, batch_size: int | None = None) -> None:
    """Refuse, naming the setting, what the one-graph decode step cannot trace (for a
    batch of ``batch_size`` rows, when given)."""
    moe = model.cfg.moe
    if moe is None:
        return
    reference_only = [m for m in model.modules() if isinstance(m, RoutedExperts) and m.reference_only]
    if reference_only and batch_size is not None and batch_size * moe.top_k > traced.TRACED_MAX_ROWS:
        # Experts only the readable loop runs (biases, gpt-oss's clamped GLU, Llama 4's
        # weight on the input) are traced per row in the graph; the loop cannot be.
        raise ConfigError(
            f"generate: compile=True runs these experts ({reference_only[0].extra_repr()}, with biases, a "
            f"clamped GLU or the routing weight on the input) traced, for at most "
            f"{traced.TRACED_MAX_ROWS // moe.top_k} prompts a batch at top_k={moe.top_k}; got {batch_size}: "
            "use fewer, or compile=False"
        )
    if moe.capacity_factor is not None:
        raise ConfigError(
            f"generate: compile=True does not support ModelConfig.moe.capacity_factor={moe.capacity_factor} "
            "(dropping tokens selects them by a data-dependent mask); use compile=False"
        )
    if moe.impl != "grouped":
        raise ConfigError(
            f"generate: compile=True needs ModelConfig.moe.impl='grouped', got {moe.impl!r} (the loop "
            "reference syncs with the host per expert); use compile=False"
        )
    for layer in model.modules():
        # The compiled step runs float RoutedExperts through `moelab.moe.ops`; another experts
        # module says with a ``compilable`` attribute whether it has an op of its own
        # (`moelab.quant.QuantizedExperts`: with its format's CPU kernel; offloaded experts
        # read the store eagerly and have none).
        if isinstance(layer, MoE) and not isinstance(layer.experts, RoutedExperts) \
                and not getattr(layer.experts, "compilable", False):
            raise ConfigError(
                f"generate: compile=True does not support these {type(layer.experts).__name__} experts "
                f"({layer.experts.extra_repr()}: no compiled op for them here); use compile=False"
            )


def decode_one_token(
    model: Transformer, ids_B1: torch.Tensor, positions_B1: torch.Tensor, cache: StaticKVCache
) -> torch.Tensor:
    """Logits ``[B, V]`` of one new token per row, written at the cache's next column.
    Traced, one-row float linears become fused reductions (`moelab.moe.traced.OneRowLinears`)."""
    with traced.OneRowLinears() if torch.compiler.is_compiling() else contextlib.nullcontext():
        out = model(ids_B1, positions=positions_B1, cache=cache, last_only=True, telemetry=False)
    return out.logits[:, -1]


def decode_one_token_greedy(
    model: Transformer, ids_B1: torch.Tensor, positions_B1: torch.Tensor, cache: StaticKVCache
) -> torch.Tensor:
    """`decode_one_token` and its argmax, ``[B]`` token ids: greedy decoding inside the graph
    (eager ``argmax`` over a 32000-wide row costs ~20 us a step; fused, next to nothing)."""
    return decode_one_token(model, ids_B1, positions_B1, cache).argmax(dim=-1)


# One compiled step per model, rebuilt when its weights change: freezing bakes the weights
# into the graph (and repacks the dense ones), so a stale graph would silently use old
# weights. Keyed weakly: a model that is gone takes its graphs with it.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model: Transformer) -> tuple:
    """Changes when any parameter or buffer is replaced or modified in place."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def compiled_decode_step(model: Transformer, *, freezing: bool = True, max_autotune: bool = False,
                         greedy: bool = False):
    """`decode_one_token` (``greedy``: `decode_one_token_greedy`) compiled for `model`
    (inductor, static shapes), cached.

    ``freezing``: inductor treats the weights as constants, which on CPU lets it repack the
    dense linears for MKL (`mkl._mkl_linear`); ``max_autotune``: inductor benchmarks its
    own GEMM templates against ATen. Both are read from inductor's global config when a
    graph is compiled (``torch.compile(options=...)`` does not reach freezing in torch
    2.13), so they are patched in around a call that may compile.

    The step is called ``step(model, ids_B1, positions_B1, cache, repeat=False)``.
    ``repeat=True`` says the call repeats the previous one but for the token and position
    values (same objects, shapes and dtypes: the steps of one generation after its first):
    such a call cannot compile, so it skips the config patch (~15 us) and runs only the
    guards that tell this function's cached graphs apart
    (``set_stance(skip_guard_eval_unsafe=True)``), not all ~300 (~0.1 ms a step).
    """
    options = {"freezing": freezing, "max_autotune": max_autotune}
    per_model = _COMPILED.setdefault(model, {})
    options_key = (*sorted(options.items()), ("greedy", greedy))
    weights = _weights_key(model)
    hit = per_model.get(options_key)
    if hit is not None and hit[0] == weights:
        return hit[1]
    # A fresh code object per (model, weights, options): dynamo caches compiled graphs on
    # the code object, and its guards do not look at weight values.
    fn = decode_one_token_greedy if greedy else decode_one_token
    fresh = type(fn)(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    # fullgraph: a graph break would silently fall back to eager for the whole step.
    compiled = torch.compile(fresh, dynamic=False, fullgraph=True)

    def step(*args, repeat: bool = False):
        try:
            if repeat and _CAN_SKIP_GUARDS:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return compiled(*args)
            with torch._inductor.config.patch(options):
                return compiled(*args)
        except RuntimeError as e:
            # The routers' finiteness check compiles to an assert (`moelab.moe.router`).
            if routing.NON_FINITE_LOGITS in str(e):
                raise NonFiniteRouterError(f"{routing.NON_FINITE_LOGITS} (in a compiled decode step)") from None
            raise

    per_model[options_key] = (weights, step)
    return step
