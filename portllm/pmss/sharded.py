"""PMSS under FSDP2 (``torch.distributed.fsdp.fully_shard``): what the functions of ``portllm.pmss``
need when a model's parameters are DTensors, sharded over ranks.

The order is ``pmss.inject`` first, then ``fully_shard`` (each decoder layer, then the root): the
skeleton is selected from the whole weight, identically on every rank (the selection is seeded), and
FSDP2 shards U like any parameter and reduces its gradients; I and J are buffers, the same on every
rank. At forward time FSDP2 all-gathers each layer's weights, so PMSSLinear sees the full weight.

Outside forward the weights are shards. ``save``, ``to_patch``, ``load`` and ``merged_state_dict``
gather each full weight and U (``DTensor.full_tensor``, a collective): on a sharded model every rank
calls them, in the same order. ``save`` writes on rank 0 only; the others wait for it.
"""

from __future__ import annotations

import torch
from torch import nn


def _dtensor():
    try:
        from torch.distributed.tensor import DTensor
    except (ImportError, RuntimeError):  # a torch built without distributed
        return None
    return DTensor


DTensor = _dtensor()


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def fsdp_module(model: nn.Module) -> str | None:
    """The name of the first module of ``model`` that fully_shard wrapped ("" for the root), or None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return next((name for name, m in model.named_modules() if isinstance(m, FSDPModule)), None)


def any_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages ``model`` (outside forward its parameters are shards; after forward the
    root's may be whole for a while, so the modules are asked, not the parameters)."""
    return fsdp_module(model) is not None or any(is_sharded(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or a DTensor's ``full_tensor()`` (a collective)."""
    return t.full_tensor() if is_sharded(t) else t


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_rank0() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def barrier():
    dist = _dist()
    if dist is not None:
        dist.barrier()


def on_rank0(fn):
    """Runs ``fn`` on rank 0 and raises its exception, if any, on every rank (the others would
    otherwise wait in the next collective for a rank that has left)."""
    err = None
    if is_rank0():
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            err = e
    dist = _dist()
    if dist is not None:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise err


def on_every_rank(fn):
    """Runs ``fn`` on every rank and returns its result; if it raised on any rank, every rank raises
    the lowest failing rank's exception (one rank leaving alone would leave the others waiting in
    the next collective)."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
        err = e
    dist = _dist()
    if dist is not None:
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise err
    return result


def reshard_all(model: nn.Module):
    """Every fully_shard module back to its shards: after a forward FSDP2 may leave some (the root's)
    whole, and a value written into a whole copy would be lost when it is freed."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def copy_into_(dst: torch.Tensor, src: torch.Tensor):
    """``dst`` (a parameter or buffer, sharded or not) takes the values of the whole tensor ``src``:
    each rank its own shard."""
    with torch.no_grad():
        if is_sharded(dst):
            from torch.distributed.tensor import distribute_tensor

            local = dst.to_local()
            part = distribute_tensor(src.to(device=local.device, dtype=local.dtype), dst.device_mesh, dst.placements,
                                     src_data_rank=None)  # (every rank holds src: each takes its shard, no traffic)
            local.copy_(part.to_local())
        else:
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
