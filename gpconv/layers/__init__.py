"""The grouped pointwise layers, their functional forms and the kernels that run them.

* :mod:`.grouping` - the group rule and the channel interleave (integer bookkeeping);
* :mod:`.modules` - :class:`BlockSpec` and the modules it builds (the io / chained / hybrid
  block, GroupedLinear, LowRankLinear);
* :mod:`.functional` - the maps as functions of tensors, with the reference torch paths;
* :mod:`.config` - :class:`KernelConfig`, which kernel runs a call;
* :mod:`.cpu` / :mod:`.cuda` - the device-specific kernels.
"""

from .config import KernelConfig, kernel_config, native_status, set_kernel_config, use_kernels
from .functional import grouped_forward, io_dense, io_forward
from .grouping import divisors, group_count, interleave, interleave_index
from .modules import (GPCONV_MODULES, VARIANTS, BlockSpec, GroupedLinear, GroupedPointwiseBlock, LowRankLinear,
                      is_gpconv_module)

__all__ = [
    "BlockSpec", "GPCONV_MODULES", "GroupedLinear", "GroupedPointwiseBlock", "KernelConfig", "LowRankLinear",
    "VARIANTS", "divisors", "group_count", "grouped_forward", "interleave", "interleave_index", "io_dense",
    "io_forward", "is_gpconv_module", "kernel_config", "native_status", "set_kernel_config", "use_kernels",
]
