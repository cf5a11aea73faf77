"""Fitting a replacement block to the dense layer it replaces: closed-form least squares for
the grouped blocks, whitened SVD for the low-rank ones, both for the hybrid, and a channel order.

* ``random``  - the paper's: fresh weights at nn.Linear's scale (training from scratch);
* ``project`` - the block closest to the dense ``W`` in Frobenius norm;
* ``fit``     - the block closest to ``W`` on the layer's inputs (``C = E[x x^T]`` from
  calibration data); ``project`` is ``fit`` with ``C = I``.
"""

from .grouped import fit_chained_, fit_grouped_weight, fit_io_weight
from .init import INITS, fit_layer, init_block_
from .linalg import DEFAULT_RIDGE, relative_error, ridge_lambda, token_relative_error, whitener
from .lowrank import fit_hybrid, init_lowrank_, svd_factors, whitened_svd
from .permutation import choose_permutation

__all__ = [
    "DEFAULT_RIDGE", "INITS", "choose_permutation", "fit_chained_", "fit_grouped_weight", "fit_hybrid", "fit_io_weight",
    "fit_layer", "init_block_", "init_lowrank_", "relative_error", "ridge_lambda", "svd_factors",
    "token_relative_error", "whitened_svd", "whitener",
]
