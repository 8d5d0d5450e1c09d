"""The Mixtral-style decoder, its config and named presets."""

from moelab.model.cache import Cache, KVCache, StaticKVCache
from moelab.model.config import ModelConfig
from moelab.model.decoder import ModelOutput, Transformer
from moelab.model.presets import PRESETS, get_preset

__all__ = ["PRESETS", "Cache", "KVCache", "ModelConfig", "ModelOutput", "StaticKVCache", "Transformer", "get_preset"]
