"""Checkpoints of an FSDP run: torch distributed checkpoint (DCP) for the sharded tensors.

``OUT/checkpoints/step-000200/`` of a sharded run holds

* ``sharded/``: DCP's files (``__R_0.distcp`` per process, ``.metadata``): the trainable
  parameters and the optimizer's per-parameter state, keyed by parameter name, each process
  writing its own shards. A later run reads them back into its own shards (the same model and
  train mode);
* ``param_groups.json``: the optimizer's hyper-parameters per group (plain numbers);
* ``scheduler.json``, ``rng.safetensors``, ``state.json`` as in :mod:`.checkpoints`.

No object is unpickled on load: DCP stores its index (``.metadata``) as a pickle, which is read
here with an unpickler that admits DCP's own metadata classes, torch dtypes and sizes only, and
only tensors go through DCP (the non-tensor optimizer values are the JSON file), so DCP's
byte-object path, which unpickles, is never taken. Every process must see the same directory
(one machine, or a filesystem shared by the nodes).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch import nn

from ..errors import GPConvError
from .checkpoints import CHECKPOINTS, prune, read_run_state, write_run_state

SHARDED = "sharded"
PARAM_GROUPS = "param_groups.json"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # frozen weights come from the starting model
_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # (the names are compared before, here)


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _states(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """The trainable parameters' and the optimizer's state dicts, of this process's shards."""
    return get_state_dict(model, optimizer, options=_OPTIONS)


def save_sharded_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer, scheduler,
                            rng_states: list[dict], state: dict, keep: int, main: bool) -> Path:
    """Write one checkpoint; every process calls it (each writes its shards). The directory is
    filled under a temporary name and renamed last, so a kill mid-save leaves the last one whole."""
    root = Path(out_dir) / CHECKPOINTS
    target = root / f"step-{step:06d}"
    tmp = root / f".{target.name}.tmp-sharded"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = _states(model, optimizer)
    dcp.save({"model": msd, "optim": osd["state"]}, checkpoint_id=str(tmp / SHARDED))
    _barrier()  # all shards on disk before the files that make it a checkpoint
    if main:
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
        (tmp / PARAM_GROUPS).write_text(json.dumps(groups, indent=1) + "\n")
        write_run_state(tmp, step, scheduler, rng_states, state)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        prune(out_dir, keep)
    _barrier()
    return target


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restore a sharded checkpoint into this process's shards, the scheduler and its RNG."""
    path = Path(path)
    reader = _SafeReader(str(path / SHARDED))
    saved = {k.split(".", 1)[1] for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
    msd, osd = _states(model, optimizer)
    if saved != set(msd):
        extra, missing = sorted(saved - set(msd)), sorted(set(msd) - saved)
        raise GPConvError(
            f"{path} does not fit this run: it trains a different set of parameters "
            f"(e.g. {(extra or missing)[0]!r}); resume with the same model and --train mode"
        )
    target = {"model": msd, "optim": osd["state"]}
    dcp.load(target, storage_reader=reader, planner=_TensorsOnly())
    groups = json.loads((path / PARAM_GROUPS).read_text())
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict={"state": target["optim"], "param_groups": groups}, options=_LOAD)
    return read_run_state(path, scheduler, rank)


# --------------------------------------------------------------------------------------------
# Reading DCP's files without unpickling anything else
# --------------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes a DCP index is made of; anything else is refused."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise GPConvError(f"checkpoint index holds {module}.{name}, which a DCP index never does; not loading it")


_ALLOWED = {("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}  # the path it was saved to


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        except FileNotFoundError:
            raise GPConvError(f"{Path(self.path).parent} is not a complete sharded checkpoint (no DCP index)") from None
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnly(DefaultLoadPlanner):
    """Only tensors are saved through DCP; a byte object (which DCP would unpickle) is refused."""

    def load_bytes(self, read_item, value) -> None:
        raise GPConvError(f"sharded checkpoint holds a non-tensor value {read_item.dest_index.fqn!r}; not unpickling it")
