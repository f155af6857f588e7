"""Quantizers, observers and fake-quantized layers (the calibration side's building blocks), AdaRound's learned
rounding, and the multi-head attention decomposed into quantizable ``nn.Linear`` projections."""
from .adaround import AdaRound
from .attention import DecomposedMultiheadAttention, decompose_attention
from .layers import (QUANT_LAYERS, QuantConv2d, QuantLinear, fold_batchnorm, fold_bn, quant_layers,
                     to_quant_layer)
from .observers import MinMaxObserver, MSEObserver, minmax_scale, mse_scale
from .quantizer import MODES, Quantizer

__all__ = ["Quantizer", "MODES", "MinMaxObserver", "MSEObserver", "minmax_scale", "mse_scale", "QuantLinear",
           "QuantConv2d", "QUANT_LAYERS", "quant_layers", "to_quant_layer", "fold_bn", "fold_batchnorm", "AdaRound",
           "DecomposedMultiheadAttention", "decompose_attention"]
