"""Surgery: plan, fit and swap in the grouped blocks; count what is left; go back to dense.

``gpconv.surgery.apply_plan`` is imported by the modeling file inside every saved checkpoint:
that path is public for good.
"""

from .budget import HYBRID_MIN_CHANNELS, Option, best_split, layer_options, solve, split_specs
from .calibrate import (Calibration, CalibrationConfig, LayerStats, calibration_from_source, check_refine,
                        collect_stats, decoder_layers, run_sequential, token_batches)
from .config import PRESETS, GPConvConfig, module_kind, parse_target, pattern_matches
from .densify import densify
from .depth import layer_importance, truncate
from .plan import PLAN_FORMAT, apply_plan, current_plan, describe, iter_blocks, plan_module, record_plan
from .report import REPORT_FILES, ModuleReport, ParamCounts, ShrinkReport, count_parameters
from .shrink import shrink

__all__ = [
    "Calibration", "CalibrationConfig", "GPConvConfig", "HYBRID_MIN_CHANNELS", "LayerStats", "ModuleReport", "Option",
    "PLAN_FORMAT", "PRESETS", "ParamCounts", "REPORT_FILES", "ShrinkReport", "apply_plan", "best_split",
    "calibration_from_source", "check_refine", "collect_stats", "count_parameters", "current_plan", "decoder_layers", "densify",
    "describe", "iter_blocks", "layer_importance", "layer_options", "module_kind", "parse_target",
    "pattern_matches", "plan_module", "record_plan", "run_sequential", "shrink", "solve", "split_specs",
    "token_batches", "truncate",
]
