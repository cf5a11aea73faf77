"""FSDP2 for recovery runs: torch's ``fully_shard`` per decoder layer plus the root.

accelerate only turns FSDP on for GPU process groups (on CPU, gloo, it stays with DDP), so the
run shards the models itself with the same engine accelerate would call (``fully_shard``) and
uses accelerate for everything else (process group, device, autocast, reductions, trackers).
One code path for GPUs and CPUs, tested on CPU with gloo.

* Each decoder layer (the model's ``_no_split_modules`` classes) is one FSDP unit, the root
  (embeddings, final norm, output layer) another: a process holds 1/W of every parameter and
  gathers one layer at a time for its forward and backward.
* Frozen and trainable parameters share units; the optimizer holds the trainable shards only,
  so its state is sharded too. Gradients are reduce-scattered and averaged over the processes,
  like DDP's all-reduce, so the loss scaling of :mod:`.training` holds unchanged.
* The frozen teacher is sharded the same way and resharded after each forward (it never runs a
  backward). A :class:`TeacherCache` keeps its teacher whole: each process calls it on its own
  cache misses, a different number of times, which sharded collectives could not follow.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..errors import GPConvError
from ..hfutil import unwrap


def wants_fsdp(distributed: str, world: int) -> bool:
    """Does this run shard? ``auto`` follows ``accelerate launch`` (its FSDP config sets
    ``ACCELERATE_USE_FSDP``); one process never shards."""
    if world < 2:
        return False
    if distributed == "auto":
        return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    return distributed == "fsdp"


def device_mesh(device: torch.device, world: int) -> DeviceMesh:
    """The 1-d mesh of all processes on this process's device type (gloo on CPU, NCCL on GPU)."""
    return init_device_mesh(device.type, (world,))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules each made one FSDP unit: instances of the model's ``_no_split_modules``
    classes (transformers names its decoder layer there); else the blocks of its longest
    ``nn.ModuleList``."""
    inner = unwrap(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise GPConvError(f"fsdp: {type(inner).__name__} has no decoder layers to shard "
                          "(no _no_split_modules and no nn.ModuleList); use distributed 'ddp'")
    return layers


def shard(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (in place; parameters become DTensors
    on the mesh's device). Each unit frees its gathered weights after its forward."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are shapes only (meta device), taken before sharding;
    :func:`gather_into` fills it with the trained weights at the end. Buffers are copied as they
    are (rotary tables are not in a state dict, and they are small)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_into(skeleton: nn.Module, sharded: nn.Module) -> nn.Module:
    """Every process gathers the full weights into ``skeleton`` (a :func:`meta_copy`), one
    parameter at a time (a collective: all processes call it), on the CPU."""
    full = dict(skeleton.named_parameters(remove_duplicate=False))
    for name, p in sharded.named_parameters(remove_duplicate=False):
        t = p.full_tensor() if isinstance(p, DTensor) else p
        owner, _, leaf = name.rpartition(".")
        target = skeleton.get_submodule(owner) if owner else skeleton
        target._parameters[leaf] = nn.Parameter(t.detach().cpu().clone(), requires_grad=full[name].requires_grad)
    for name, b in sharded.named_buffers():
        owner, _, leaf = name.rpartition(".")
        target = skeleton.get_submodule(owner) if owner else skeleton
        if leaf in target._buffers:
            target._buffers[leaf] = b.detach().cpu().clone()
    tie = getattr(unwrap(skeleton), "tie_weights", None)
    if callable(tie):  # one tensor for tied embeddings again, as the student had
        tie()
    return skeleton


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip sharded gradients by their global norm; the norm as a number (all processes agree)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


@torch.no_grad()
def idle_forwards(model: nn.Module, count: int, ids: torch.Tensor) -> None:
    """Forward passes whose result is dropped: a process with fewer validation batches than the
    others runs these, so every process joins the same number of gathers."""
    was_training = model.training
    model.eval()
    try:
        for _ in range(count):
            model(ids)
    finally:
        model.train(was_training)
