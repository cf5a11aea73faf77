"""How a data source becomes token blocks: one :class:`DataConfig`, read by
:func:`gpconv.build_datasets`, the CLI's data options and a recipe's ``data`` section."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GPConvError

FORMATS = ("kphi3", "chat-template", "plain")


@dataclass(frozen=True)
class DataConfig:
    """Rendering, packing and splitting of one data source."""

    format: str = "kphi3"
    """kphi3 (<|user|>...<|end|><|assistant|>...<|end|>, the paper) | chat-template | plain."""
    block_size: int = 512
    """Tokens per packed block."""
    val_size: int | float | None = None
    """Held-out rows: an integer count or a fraction like 0.05. None: 5% up to 1000; 0: none."""
    response_only: bool = False
    """Count the loss on response tokens only."""
    max_samples: int | None = None
    """Read at most this many rows of the source."""
    pack: bool = True
    """Concatenate samples into blocks, or one padded sample per block."""
    streaming: bool | None = None
    """Read the source lazily. None: only for lamini."""
    split: str | None = None
    """The hub split to read (None: the source's default, usually train)."""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise GPConvError(f"unknown data format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise GPConvError(f"block_size must be at least 2, got {self.block_size}")
