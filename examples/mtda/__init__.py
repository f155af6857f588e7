"""The main job of hdrq as an application: multi-target domain adaptation of merged low-bit models.

A source model is trained, adapted to several target domains (SHOT-IM), every adapted copy is quantized
(RTN, BRECQ, QDrop, HDRQ through ``hdrq.quantize``), the copies are merged (``hdrq.merge``, both the plain
average and the noise-sampling merge) and the merged model is scored on every target; the error barrier,
Hessian trace, distances and moved integers of each method's models are measured along the way.

    python -m examples.mtda [--quick | --full] [options]      (make demo runs it)

Modules: ``config`` (the protocols), ``data`` / ``real`` / ``synthetic`` / ``folders`` (domains),
``model`` (the network, training, scoring), ``adapt`` (SHOT-IM), ``measure`` (barrier, flatness,
distances), ``run`` (the pipeline), ``report`` (statistics, tables, plots), ``cli``.
"""
from .config import METHODS, QUANT_METHODS, MTDAConfig

__all__ = ["MTDAConfig", "METHODS", "QUANT_METHODS"]
