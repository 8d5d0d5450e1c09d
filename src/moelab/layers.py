"""The declared layer order of the package, as data (enforced by tests/test_layering.py).

A module may import its own layer and any *lower* layer, never a higher one, nor a
sibling beside it in the same tier (not even inside a function; imports under
``if TYPE_CHECKING:`` are exempt). Tiers, lowest first:

    errors, io, lazy, hardware -> moe -> model -> rundir -> accounting -> data
        -> train, infer, quant -> offload -> hf, dist -> lab, serve -> playground -> cli

`accounting` is pure arithmetic: besides itself it imports only `ACCOUNTING_MAY_IMPORT`,
the torch-free modules (so ``moelab size`` starts instantly, without torch). `infer` sits
above `model` and hosts nothing the model needs. `playground` (the browser lab) has a tier
of its own above `lab` and `serve`: its Break panel runs lab experiments, which a sibling of
`lab` could not import.
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "io", "layers", "lazy", "hardware"),  # layers: this table; lazy: PEP 562 namespaces; hardware: capability probes
    ("moe",),
    ("model",),
    ("rundir",),
    ("accounting",),
    ("data",),
    ("train", "infer", "quant"),
    ("offload",),  # above quant: it offloads quantised experts too
    ("hf", "dist"),
    ("lab", "serve"),
    ("playground",),
    ("cli",),
)

# The modules accounting may import besides its own (all torch-free). A package's
# `__init__` runs on import of a submodule, so these packages keep lazy `__init__`s.
ACCOUNTING_MAY_IMPORT = frozenset({
    "moelab",
    "moelab.errors",
    "moelab.io",
    "moelab.lazy",
    "moelab.moe",
    "moelab.moe.config",
    "moelab.model",
    "moelab.model.config",
    "moelab.model.presets",
    "moelab.rundir",
    "moelab.rundir.files",
})

# Pairs (importer, imported) that the tiers would allow but the design does not: HF interop
# reads and writes run directories through `rundir`, never through the trainer.
FORBIDDEN: frozenset[tuple[str, str]] = frozenset({("hf", "train")})

# The top-level package re-exports the MoE layer's names.
ROOT_LAYER = "moe"


def tier(layer: str) -> int:
    """The index of `layer`'s tier in `LAYERS` (KeyError: an undeclared layer)."""
    for i, names in enumerate(LAYERS):
        if layer in names:
            return i
    raise KeyError(f"layer {layer!r} is not declared in moelab.layers.LAYERS")
