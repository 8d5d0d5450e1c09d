"""Quantised experts: int8 / int4 formats, the quantised experts backend, the module swap,
and quantised checkpoints on disk (`save_quantized`, `load_quantized`).

Names are imported from their submodule on first use (PEP 562).
"""

from moelab.lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "QuantFormat": "moelab.quant.formats",
    "QuantReport": "moelab.quant.quantize",
    "QuantizedExperts": "moelab.quant.experts",
    "load_quantized": "moelab.quant.checkpoint",
    "save_quantized": "moelab.quant.checkpoint",
    "dequantize_int4": "moelab.quant.formats",
    "dequantize_int8": "moelab.quant.formats",
    "quantize_int4": "moelab.quant.formats",
    "quantize_int8": "moelab.quant.formats",
    "quantize_model": "moelab.quant.quantize",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
