"""Quantizers, observers and fake-quantized layers (the calibration side's building blocks), AdaRound's learned
rounding, and the multi-head attention decomposed into quantizable ``nn.Linear`` projections."""
from .adaround import AdaRound
from .attention import DecomposedMultiheadAttention, decompose_attention
from .boundary import BLOCK_INPUT, BLOCK_OUTPUT, attach_block_quantizer, boundary_quantizers
from .layers import (QUANT_LAYERS, QuantConv2d, QuantLayer, QuantLinear, compact_weights, expand_weights,
                     float_state_dict, fold_batchnorm, fold_bn, is_transposed_linear, linear_from_transposed,
                     linearize_transposed, quant_layers, set_module, to_quant_layer)
from .observers import MinMaxObserver, MSEObserver, minmax_scale, mse_scale
from .quantizer import MODES, Quantizer

__all__ = ["Quantizer", "MODES", "MinMaxObserver", "MSEObserver", "minmax_scale", "mse_scale", "QuantLayer",
           "QuantLinear", "QuantConv2d", "QUANT_LAYERS", "quant_layers", "to_quant_layer", "set_module", "fold_bn",
           "fold_batchnorm", "compact_weights", "expand_weights", "float_state_dict", "is_transposed_linear",
           "linear_from_transposed", "linearize_transposed", "AdaRound", "DecomposedMultiheadAttention",
           "decompose_attention", "BLOCK_INPUT", "BLOCK_OUTPUT", "attach_block_quantizer", "boundary_quantizers"]
