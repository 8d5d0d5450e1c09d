"""Exact parameter, FLOP and memory accounting of MoE and dense transformers (`moelab size`)."""

from moelab.accounting.hf_config import load_hf_config, spec_from_hf_config
from moelab.accounting.moelab_config import spec_from_moelab_config
from moelab.accounting.params import ParamCount, count_params
from moelab.accounting.published import PRESETS, get_preset
from moelab.accounting.report import render_table, resolve, size_report
from moelab.accounting.spec import (
    ArchSpec,
    AttentionSpec,
    ExplicitSpec,
    LayerSpec,
    MLPSpec,
    MoESpec,
)

__all__ = [
    "PRESETS",
    "ArchSpec",
    "AttentionSpec",
    "ExplicitSpec",
    "LayerSpec",
    "MLPSpec",
    "MoESpec",
    "ParamCount",
    "count_params",
    "get_preset",
    "load_hf_config",
    "render_table",
    "resolve",
    "size_report",
    "spec_from_hf_config",
    "spec_from_moelab_config",
]
