"""The Mixtral-style decoder, its config and named presets."""

from moelab.model.config import ModelConfig
from moelab.model.decoder import ModelOutput, Transformer
from moelab.model.presets import PRESETS, get_preset

__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "Transformer", "get_preset"]
