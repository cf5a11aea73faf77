"""gpconv: make causal LMs smaller with grouped pointwise blocks (kphi-3), then recover them.

    import gpconv
    report = gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=256))
    report.print()
    gpconv.save_pretrained(model, "kphi3-mini", tokenizer)
    model = gpconv.from_pretrained("kphi3-mini")

The names here are the whole everyday face; the rest lives in named subpackages, lowest first:
``gpconv.layers`` (the blocks and their kernels), ``gpconv.fitting`` (closed-form fits),
``gpconv.surgery`` (plans, budgets, calibration, reports), ``gpconv.hub`` (models in and out),
``gpconv.recovery`` (distillation, training, evaluation), ``gpconv.recipes``, ``gpconv.deploy``
(ONNX export and ONNX Runtime).
"""

import importlib
import warnings

from ._version import __version__  # noqa: F401 (gpconv.__version__)
from .data import build_datasets
from .errors import GPConvError
from .deploy import export
from .hub import from_pretrained, load_model, save_pretrained
from .recovery import TeacherCache, TrainConfig, distill, evaluate, train
from .surgery import Calibration, GPConvConfig, ShrinkReport, densify, shrink

__all__ = [
    "Calibration",
    "GPConvConfig",
    "GPConvError",
    "ShrinkReport",
    "TeacherCache",
    "TrainConfig",
    "build_datasets",
    "densify",
    "distill",
    "evaluate",
    "export",
    "from_pretrained",
    "load_model",
    "save_pretrained",
    "shrink",
    "train",
]

# Top-level names of gpconv 0.1 that moved into a subpackage: still reachable here, with a
# DeprecationWarning that names the new home (removed in a later release; docs/changelog.md).
_MOVED = {
    "BlockSpec": "gpconv.layers", "GroupedLinear": "gpconv.layers", "GroupedPointwiseBlock": "gpconv.layers",
    "LowRankLinear": "gpconv.layers", "group_count": "gpconv.layers", "interleave": "gpconv.layers",
    "ParamCounts": "gpconv.surgery", "count_parameters": "gpconv.surgery", "load_into": "gpconv.hub",
    "StreamingBlocks": "gpconv.data", "TokenBlocks": "gpconv.data", "TrainResult": "gpconv.recovery",
    "TrainingDiverged": "gpconv.recovery", "compare": "gpconv.recovery", "generate": "gpconv.recovery",
}


def __getattr__(name: str):
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'gpconv' has no attribute {name!r}")
    warnings.warn(f"gpconv.{name} moved to {home}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
