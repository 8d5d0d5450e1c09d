"""Hugging Face interop: import HF MoE / dense checkpoints, export moelab models to HF."""

from moelab.hf.adapter import FAMILIES, config_from_hf, config_to_hf, hf_family_for
from moelab.hf.export import HFExport, export_hf
from moelab.hf.loader import HFImport, from_pretrained, load_hf
from moelab.hf.native import LoadedModel, load_any, load_moelab, save_moelab

__all__ = [
    "FAMILIES",
    "HFExport",
    "HFImport",
    "LoadedModel",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "from_pretrained",
    "hf_family_for",
    "load_any",
    "load_hf",
    "load_moelab",
    "save_moelab",
]
