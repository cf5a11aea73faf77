"""The blocks of every step, from ``(seed, step)`` alone: exact resumes, any number of processes."""

from __future__ import annotations

import torch

from ..data import StreamingBlocks, TokenBlocks
from ..errors import GPConvError


def as_train_data(data):
    """Training blocks: in memory or streamed, or an ``(n_blocks, block_size)`` id tensor."""
    if isinstance(data, (TokenBlocks, StreamingBlocks)):
        return data
    if isinstance(data, torch.Tensor):
        return TokenBlocks(data)
    raise GPConvError(f"training data must be gpconv token blocks (gpconv.build_datasets) or an id tensor, not {type(data).__name__}")


class BatchPlan:
    """The blocks of every step, a function of ``(seed, step)`` only (so resuming is exact).

    In-memory blocks: epoch ``e`` visits them in ``randperm(n, seed + e)`` order, and a step
    takes the next ``global_batch`` positions of that endless sequence. Streamed blocks: the
    stream in order, reshuffled per epoch by its own seeded buffer; seeking re-reads it.
    """

    def __init__(self, data, batch_size: int, grad_accum: int, world: int, rank: int, seed: int):
        self.data, self.B, self.A, self.W, self.rank, self.seed = data, batch_size, grad_accum, world, rank, seed
        self.global_batch = batch_size * grad_accum * world
        self.streaming = isinstance(data, StreamingBlocks)
        self._order: tuple[int, torch.Tensor] | None = None
        self._it, self._pos, self._epoch = None, 0, 0
        if not self.streaming and len(data) == 0:
            raise GPConvError("the training data holds no blocks")

    @property
    def blocks(self) -> int | None:
        return None if self.streaming else len(self.data)

    def epoch(self, step: int) -> float | None:
        """Passes over the training blocks after ``step`` steps (unknown for a stream)."""
        return None if self.streaming else step * self.global_batch / len(self.data)

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.data), generator=g))
        return self._order[1]

    def _next_streamed(self) -> dict:
        for _ in range(2):
            if self._it is not None:
                item = next(self._it, None)
                if item is not None:
                    self._pos += 1
                    return item
                self._epoch += 1
            self.data.set_epoch(self._epoch)
            self._it = iter(self.data)
        raise GPConvError("the streamed training data yields no blocks")

    def _global(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        G = self.global_batch
        if self.streaming:
            if self._pos != step * G:  # resume: replay the stream up to this step
                self._it, self._pos, self._epoch = None, 0, 0
                for _ in range(step * G):
                    self._next_streamed()
            items = [self._next_streamed() for _ in range(G)]
            return torch.stack([x["input_ids"] for x in items]), torch.stack([x["labels"] for x in items])
        n = len(self.data)
        pos = torch.arange(step * G, (step + 1) * G)
        index = torch.empty(G, dtype=torch.long)
        for e in pos.div(n, rounding_mode="floor").unique().tolist():
            sel = pos // n == e
            index[sel] = self._perm(e)[pos[sel] % n]
        return self.data.batch(index)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's ``grad_accum`` micro-batches of ``step``: slice ``i*W + rank`` of the global batch."""
        ids, labels = self._global(step)  # (G, T) each
        out = []
        for i in range(self.A):
            s = (i * self.W + self.rank) * self.B
            out.append((ids[s:s + self.B], labels[s:s + self.B]))
        return out
