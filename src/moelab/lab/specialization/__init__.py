"""Expert specialisation: which experts each domain, token and position is routed to.

* `stats`: the statistics (pure functions of routing tensors), `analyze_model` that
  routes held-out text through a model and computes them all, and the result types;
* `token_text`: the display text of token ids (the byte-level BPE table);
* `analysis`: an analysis on disk: held-out tokens, ``analysis.json`` / ``analysis.html``
  / plots (`write_analysis`), the CLI's summary lines and `analyze_checkpoint`.

The HTML is `moelab.lab.report`'s, the plots `moelab.lab.plots`'. The public names are
importable from here, as they were when this was one module.
"""

from moelab.lab.specialization.analysis import (
    analyze_checkpoint,
    held_out_tokens,
    summary_lines,
    write_analysis,
)
from moelab.lab.specialization.stats import (
    ANALYSIS_FORMAT,
    ANALYSIS_VERSION,
    AnalysisConfig,
    ColouredSample,
    Consistency,
    LayerSpecialization,
    SpecializationResult,
    TokenScore,
    analyze_model,
    coactivation,
    expert_distribution,
    random_consistency_baseline,
    route_tokens,
    routing_consistency,
    token_share,
    vocabulary_specialization,
)
from moelab.lab.specialization.token_text import TokenText

__all__ = [
    "ANALYSIS_FORMAT",
    "ANALYSIS_VERSION",
    "AnalysisConfig",
    "ColouredSample",
    "Consistency",
    "LayerSpecialization",
    "SpecializationResult",
    "TokenScore",
    "TokenText",
    "analyze_checkpoint",
    "analyze_model",
    "coactivation",
    "expert_distribution",
    "held_out_tokens",
    "random_consistency_baseline",
    "route_tokens",
    "routing_consistency",
    "summary_lines",
    "token_share",
    "vocabulary_specialization",
    "write_analysis",
]
