"""Training, evaluation and calibration data: sources -> rows -> records -> token blocks."""

from .blocks import (StreamingBlocks, TokenBlocks, Tokenization, as_blocks, build_datasets, pack, render, split_rows,
                     tokenize)
from .config import FORMATS, DataConfig
from .sources import HUB_ALIASES, LOCAL_SUFFIXES, SCHEMAS, Rows, check_local_source, detect_schema, load_rows, to_record

__all__ = [
    "DataConfig", "FORMATS", "HUB_ALIASES", "LOCAL_SUFFIXES", "Rows", "SCHEMAS", "StreamingBlocks", "TokenBlocks",
    "Tokenization", "as_blocks", "build_datasets", "check_local_source", "detect_schema", "load_rows", "pack", "render",
    "split_rows", "to_record", "tokenize",
]
