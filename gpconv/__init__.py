"""gpconv: make causal LMs smaller with grouped pointwise blocks (kphi-3), then recover them.

    import gpconv
    report = gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=256))
    report.print()
    gpconv.save_pretrained(model, "kphi3-mini", tokenizer)
    model = gpconv.from_pretrained("kphi3-mini")
"""

__version__ = "0.1.0"

from .errors import GPConvError
from .grouping import group_count, interleave
from .layers import BlockSpec, GroupedLinear, GroupedPointwiseBlock, LowRankLinear
from .report import ParamCounts, ShrinkReport, count_parameters
from .surgery import GPConvConfig, shrink
from .io import densify, from_pretrained, load_into, save_pretrained
from .models import load_model
from .data import StreamingBlocks, TokenBlocks, build_datasets
from .teacher_cache import TeacherCache
from .training import TrainConfig, TrainingDiverged, TrainResult, distill, train
from .evaluation import compare, evaluate, generate

__all__ = [
    "__version__",
    "BlockSpec",
    "GPConvConfig",
    "GPConvError",
    "GroupedLinear",
    "GroupedPointwiseBlock",
    "LowRankLinear",
    "ParamCounts",
    "ShrinkReport",
    "count_parameters",
    "densify",
    "from_pretrained",
    "group_count",
    "interleave",
    "load_into",
    "load_model",
    "save_pretrained",
    "shrink",
    # recovery
    "StreamingBlocks",
    "TeacherCache",
    "TokenBlocks",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_datasets",
    "compare",
    "distill",
    "evaluate",
    "generate",
    "train",
]
