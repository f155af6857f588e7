"""Calibration: RTN, BRECQ, QDrop and HDRQ block reconstruction behind one call, ``hdrq.quantize``.

    import hdrq
    cfg = hdrq.QuantConfig.preset("hdrq", w_bits=4, a_bits=4, iters=2000)
    qmodel = hdrq.quantize(model, calib_images, cfg, source=pretrained_model)

Modules: ``config`` (QuantConfig and presets), ``blocks`` (what is reconstructed together), ``cache``
(calibration data, cached block inputs/targets), ``reconstruct`` (the optimisation loop), ``engine``
(the pipeline), ``stream`` (the same pipeline one block at a time on the device), ``checkpoint``
(calibrated-model files and per-block checkpoints for resuming).
"""
from .blocks import (Block, find_blocks, is_residual_block, is_transformer_block, quantizable_layers,
                     report_unquantizable, unquantizable_layers)
from .checkpoint import load_quantized, save_quantized
from .cache import BlockCache, collect_calib_data
from .config import METHODS, PRESETS, QuantConfig, check_device
from .engine import prepare_float, quantize, smooth_factors, smooth_scales
from .reconstruct import BlockReconstructor, BlockReport, finalize_layer, reconstruction_loss

__all__ = ["QuantConfig", "quantize", "METHODS", "PRESETS", "Block", "find_blocks", "is_residual_block",
           "is_transformer_block", "quantizable_layers", "unquantizable_layers", "report_unquantizable",
           "check_device", "BlockCache", "collect_calib_data", "prepare_float", "smooth_scales", "smooth_factors",
           "BlockReconstructor", "BlockReport", "finalize_layer", "reconstruction_loss", "save_quantized",
           "load_quantized"]
