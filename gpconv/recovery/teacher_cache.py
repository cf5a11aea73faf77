"""A teacher cache: the top ``k`` of the teacher's next-token distribution, per training block.

Distillation runs the teacher's forward pass on every block of every step; on SmolLM2-135M on
a CPU that is about a third of a step (docs/recovery.md). The teacher never changes, so its
answer for a block can be kept: the next epoch, a resumed run, another student or another seed
on the same data reads it instead of running the teacher again, and a run whose blocks are all
cached does not need the teacher in memory at all.

Keeping all ``V`` log-probabilities is too much (SmolLM2: 49,152 floats per token), so each
position keeps the teacher's ``k`` most likely tokens and the mass of everything else as one
"rest" bucket. The KL is then taken between the two ``k + 1``-bucket distributions::

    KL_k = sum_{i in top-k} q_i (log q_i - log p_i) + q_rest (log q_rest - log p_rest)

where ``p_rest`` is the student's mass outside the teacher's top ``k``. Merging buckets can only
lose information, so ``KL_k <= KL`` (log-sum inequality), with equality at ``k = V``; when the
teacher's top ``k`` holds nearly all its mass, the two are close (docs/recovery.md measures what
it costs). Blocks are found by a digest of their token ids, so the cache does not depend on the
order, the batch size or the seed that picks the blocks.

    cache = gpconv.TeacherCache(teacher, top_k=64)
    gpconv.distill(student_a, cache, train)   # fills the cache while it trains
    gpconv.distill(student_b, cache, train)   # same blocks: no teacher forward at all
    cache.save("teacher-cache")               # and later: gpconv.TeacherCache.load("teacher-cache")
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import as_blocks
from ..errors import GPConvError
from ..fsutil import atomic_dir
from .. import hfutil
from .losses import Positions, TopKTargets, model_outputs, top_k_of

CACHE_WEIGHTS = "teacher_cache.safetensors"
CACHE_META = "teacher_cache.json"
FORMAT_VERSION = 1


def block_digest(ids: torch.Tensor) -> bytes:
    """16-byte digest of one block's token ids: the cache key (order and batch independent)."""
    return hashlib.blake2b(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes(), digest_size=16).digest()


def check_settings(cfg, cache: "TeacherCache | None" = None,
                   names: tuple[str, str, str] = ("teacher_top_k", "temperature", "hidden-state loss (hidden_weight)")) -> None:
    """Refuse run settings (a :class:`gpconv.TrainConfig`) that a teacher cache cannot serve:
    a hidden-state loss, and with ``cache`` a different top-k or temperature. ``names``: how the
    caller spells top-k, the temperature and the hidden-state weight (the API's fields, the CLI's
    flags), so that the command line can refuse them before any model loads."""
    k_name, t_name, h_name = names
    if cfg.hidden_weight > 0:
        raise GPConvError(f"a teacher cache keeps next-token distributions only: no {h_name} with it")
    if cache is None:
        return
    if cfg.teacher_top_k and cfg.teacher_top_k != cache.top_k:
        raise GPConvError(f"{k_name} {cfg.teacher_top_k}: the teacher cache keeps the top {cache.top_k}")
    if cfg.temperature != cache.temperature:
        raise GPConvError(f"{t_name} {cfg.temperature}: the teacher cache was made at {cache.temperature} "
                          f"and only serves temperature {cache.temperature}")


class TeacherCache:
    """The teacher's top-``k`` next-token distribution per block, filled on first use.

    Pass it to :func:`gpconv.distill` in place of the teacher. Blocks it has not seen are run
    through ``teacher`` (when there is one) and kept; a cache loaded from disk without a teacher
    can only serve the blocks it holds. It lives on the CPU; each lookup moves one micro-batch's
    rows to the training device.
    """

    def __init__(self, teacher: nn.Module | None = None, top_k: int = 64, temperature: float = 1.0,
                 vocab_size: int | None = None, teacher_name: str | None = None):
        if top_k < 1:
            raise GPConvError(f"top_k must be at least 1, got {top_k}")
        if temperature <= 0:
            raise GPConvError(f"temperature must be > 0, got {temperature}")
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if vocab_size is None:
                vocab_size = hfutil.vocab_size(teacher)
            if teacher_name is None:
                teacher_name = getattr(getattr(teacher, "config", None), "_name_or_path", None) or type(teacher).__name__
        self.teacher = teacher
        self.top_k = top_k
        self.temperature = float(temperature)
        self.vocab_size = vocab_size
        self.teacher_name = teacher_name
        self.block_size: int | None = None
        self._row: dict[bytes, int] = {}
        self._index: list[torch.Tensor] = []  # per block (T, k) int32
        self._logq: list[torch.Tensor] = []  # per block (T, k) fp32
        self._rest: list[torch.Tensor] = []  # per block (T,) fp32
        self._probe: torch.Tensor | None = None  # the ids of the first cached block: check_teacher reruns it
        self.hits = 0
        self.misses = 0
        self.teacher_s = 0.0
        """Seconds spent in the teacher's forward passes filling the cache."""

    def __len__(self) -> int:
        return len(self._row)

    def covers(self, data) -> bool:
        """Whether every block of ``data`` (token blocks or an id tensor) is cached."""
        blocks = as_blocks(data, streamed=True)
        if not hasattr(blocks, "input_ids"):
            return False  # a stream: its blocks are not known in advance
        return all(block_digest(row) in self._row for row in blocks.input_ids)

    # -- filling ------------------------------------------------------------------------------

    def _check_block_size(self, T: int) -> None:
        if self.block_size is None:
            self.block_size = T
        elif T != self.block_size:
            raise GPConvError(f"the teacher cache holds blocks of {self.block_size} tokens, these have {T}; "
                              "use one cache per --block-size")

    @torch.no_grad()
    def _compute(self, ids: torch.Tensor) -> None:
        """Run the teacher on ``ids`` (B, T) and store each row."""
        if self.teacher is None:
            raise GPConvError(f"{ids.shape[0]} block(s) are not in the teacher cache and it has no teacher to compute them "
                              "(load it with the teacher, or fill it from the same data first)")
        device = next(self.teacher.parameters()).device
        t0 = time.perf_counter()
        logits, _ = model_outputs(self.teacher, ids.to(device))  # (B, T, V)
        if self.vocab_size is not None and logits.shape[-1] != self.vocab_size:
            raise GPConvError(f"the teacher predicts {logits.shape[-1]} tokens, the cache was made for {self.vocab_size}")
        self.vocab_size = logits.shape[-1]
        idx, logq, rest = (t.cpu() for t in top_k_of(logits, self.top_k, self.temperature))  # .cpu() waits for the GPU
        self.teacher_s += time.perf_counter() - t0
        if self._probe is None:
            self._probe = ids[0].detach().cpu().clone()
        for b in range(ids.shape[0]):
            self._store(block_digest(ids[b]), idx[b], logq[b], rest[b])

    def _store(self, key: bytes, idx: torch.Tensor, logq: torch.Tensor, rest: torch.Tensor) -> None:
        if key in self._row:
            return
        self._row[key] = len(self._index)
        self._index.append(idx.contiguous())
        self._logq.append(logq.contiguous())
        self._rest.append(rest.contiguous())

    def fill(self, data, batch_size: int = 8) -> int:
        """Compute every block of ``data`` not yet cached; returns how many were added."""
        blocks = as_blocks(data, streamed=True)
        if not hasattr(blocks, "input_ids"):
            raise GPConvError("fill needs blocks in memory (a stream's blocks are cached as training meets them)")
        self._check_block_size(blocks.block_size)
        todo = [i for i, row in enumerate(blocks.input_ids) if block_digest(row) not in self._row]
        for s in range(0, len(todo), batch_size):
            self._compute(blocks.input_ids[todo[s:s + batch_size]])
        return len(todo)

    # -- lookup -------------------------------------------------------------------------------

    def targets(self, ids: torch.Tensor, labels: torch.Tensor, temperature: float | None = None) -> TopKTargets:
        """The teacher's top-``k`` targets at the counted rows of one micro-batch ``(B, T)``."""
        if temperature is not None and float(temperature) != self.temperature:
            raise GPConvError(f"the teacher cache was made at temperature {self.temperature}, the run asks for {temperature}")
        self._check_block_size(ids.shape[1])
        keys = [block_digest(row) for row in ids]
        missing = [b for b, key in enumerate(keys) if key not in self._row]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            self._compute(ids[missing])
        rows = [self._row[key] for key in keys]
        pos = Positions.of(labels.cpu())
        k = self._index[0].shape[-1]
        # (B, T, k) -> (B*T, k), then the counted rows only
        index = pos.rows(torch.stack([self._index[r] for r in rows]).view(-1, k))
        logq = pos.rows(torch.stack([self._logq[r] for r in rows]).view(-1, k))
        rest = pos.rows(torch.stack([self._rest[r] for r in rows]).view(-1))
        dev = labels.device
        return TopKTargets(index.to(dev, torch.long), logq.to(dev), rest.to(dev), self.temperature, self.vocab_size)

    # -- disk ---------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write ``teacher_cache.safetensors`` + ``teacher_cache.json`` to the directory ``path``
        (written beside it, then renamed into place). An existing teacher cache there is
        replaced; any other non-empty directory is refused."""
        if not self._row:
            raise GPConvError("the teacher cache is empty: nothing to save")
        path = Path(path).expanduser()
        if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / CACHE_META).is_file())):
            raise GPConvError(f"{path} exists and is not a teacher cache; choose another directory for it")
        # the dict's keys are in insertion order, which is the order of the stored rows
        digests = torch.frombuffer(bytearray(b"".join(self._row)), dtype=torch.uint8).view(-1, 16)
        tensors = {"digest": digests, "index": torch.stack(self._index), "logq": torch.stack(self._logq),
                   "log_rest": torch.stack(self._rest)}
        if self._probe is not None:
            tensors["probe_ids"] = self._probe
        meta = {"format_version": FORMAT_VERSION, "top_k": self.top_k, "temperature": self.temperature,
                "vocab_size": self.vocab_size, "block_size": self.block_size, "teacher": self.teacher_name,
                "blocks": len(self._row)}
        with atomic_dir(path, overwrite=True) as tmp:
            save_file(tensors, str(tmp / CACHE_WEIGHTS))
            (tmp / CACHE_META).write_text(json.dumps(meta, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path, teacher: nn.Module | None = None) -> "TeacherCache":
        """Read a cache written by :meth:`save` (safetensors and JSON: nothing is unpickled).

        With ``teacher``, blocks missing from the cache are computed with it; it is checked
        against the cache first (see :meth:`check_teacher`).
        """
        path = Path(path).expanduser()
        meta_file, weights = path / CACHE_META, path / CACHE_WEIGHTS
        if not meta_file.is_file() or not weights.is_file():
            raise GPConvError(f"{path} is not a teacher cache ({CACHE_META} and {CACHE_WEIGHTS} expected)")
        try:
            meta = json.loads(meta_file.read_text())
            t = load_file(str(weights))
        except Exception as e:  # a truncated or foreign file
            raise GPConvError(f"cannot read the teacher cache in {path}: {e}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise GPConvError(f"{path}: teacher cache format {meta.get('format_version')}, this gpconv reads {FORMAT_VERSION}")
        n = t["digest"].shape[0]
        if not (t["index"].shape[0] == t["logq"].shape[0] == t["log_rest"].shape[0] == n == meta["blocks"]):
            raise GPConvError(f"{path}: the teacher cache's tensors disagree on the number of blocks")
        cache = cls(None, meta["top_k"], meta["temperature"], meta["vocab_size"], meta.get("teacher"))
        cache.block_size = meta["block_size"]
        cache._probe = t.get("probe_ids")
        for i in range(n):
            cache._store(bytes(t["digest"][i].tolist()), t["index"][i], t["logq"][i], t["log_rest"][i])
        if teacher is not None:
            cache.check_teacher(teacher)
        return cache

    @torch.no_grad()
    def check_teacher(self, teacher: nn.Module) -> None:
        """Attach ``teacher`` (it computes the blocks the cache lacks) after checking that it
        made the cache: its vocabulary size must match, and on the first cached block it must
        give the same top token at >= 95% of the positions (mixed precision moves a few
        near-ties) with log-probabilities within 0.1 of the cached ones at the median position.
        """
        v = hfutil.vocab_size(teacher)
        if self.vocab_size is not None and v is not None and v != self.vocab_size:
            raise GPConvError(f"the teacher cache was made for a {self.vocab_size}-token vocabulary, this teacher predicts {v}")
        teacher.eval().requires_grad_(False)
        r = None if self._probe is None else self._row.get(block_digest(self._probe))
        if r is not None:
            device = next(teacher.parameters()).device
            logits, _ = model_outputs(teacher, self._probe[None].to(device))  # (1, T, V)
            idx, logq, _ = top_k_of(logits[0], 1, self.temperature)  # (T, 1) each
            same_top = (idx[:, 0].cpu() == self._index[r][:, 0]).float().mean().item()
            diff = (logq[:, 0].cpu() - self._logq[r][:, 0]).abs().median().item()
            if same_top < 0.95 or diff > 0.1:
                raise GPConvError(f"this teacher disagrees with the teacher cache (same top token at {same_top:.0%} of the "
                                  f"positions, median log-prob difference {diff:.3f}); the cache was made by "
                                  f"{self.teacher_name or 'another teacher'}")
        self.teacher = teacher
