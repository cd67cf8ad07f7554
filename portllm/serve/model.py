"""Serving many patches on one base model: ``attach``, ``route``, ``load``, ``unload``, ``detach``.

    model = portllm.serve.attach(model, {"alice": "adapters/alice", "bob": bob_patch}, max_patches=8)
    with torch.no_grad(), portllm.serve.route(model, ["alice", None, "bob"]):
        logits = model(input_ids).logits          # row 0 with alice's patch, row 1 the base, row 2 bob's
        out = model.generate(input_ids, max_new_tokens=20)
    portllm.serve.load(model, "carol", "adapters/carol")   # into a free slot, no allocation
    portllm.serve.unload(model, "bob")
    model = portllm.serve.detach(model)                    # plain nn.Linear layers again

Threads. ``route`` is per thread: each thread's forwards use the routing of its own innermost route
block, never another thread's. A route block pins the patches it names until it ends: while any
thread is inside a block that names ``alice``, ``unload(model, "alice")`` raises ``ServeError``, and
so does a replacement ``load(model, "alice", ...)`` from any other thread, so no forward ever sees
a patch change under it. The thread that routes to ``alice`` may replace it in place between its
own forwards (the hot swap; a captured CUDA graph replays with the new patch). Loading into a free
slot and unloading an unrouted patch are safe at any time, from any thread: no forward uses those
slots. To swap a patch other threads are serving, load the new one under a new name, route new
requests to it, and unload the old name when their blocks end. ``load``, ``unload``, ``route`` and
``detach`` are serialised by one lock per model.

A forward sees only its own thread's routing: a thread started inside a route block (a streamer's
``Thread(target=model.generate)``, a worker pool) runs the base model unless it enters ``route``
itself. ``route`` is also a decorator for that: ``Thread(target=serve.route(model, names)(model.generate),
kwargs=...)``. Under asyncio, run each request's forwards in a worker thread (``asyncio.to_thread``)
with its own route block: tasks of one thread share the thread's routing.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from portllm.compat import resolve_fan_in_fan_out
from portllm.patch import Patch
from portllm.serve.layer import PatchedLinear, Routing
from portllm.targets import describe, matches

_STATE = "_portllm_serve"


class ServeError(ValueError):
    """A patch or a routing request that does not fit the served model; the message names it."""


@dataclass
class _Served:
    layers: dict[str, PatchedLinear]
    max_patches: int
    max_rank: int
    routing: Routing
    slots: dict[str, int] = field(default_factory=dict)  # patch name -> slot
    # patch name -> {thread id: route blocks of that thread naming it}
    pins: dict[str, Counter] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __deepcopy__(self, memo):
        import copy

        return _Served(copy.deepcopy(self.layers, memo), self.max_patches, self.max_rank,
                       copy.deepcopy(self.routing, memo), dict(self.slots))

    def pin(self, names, delta: int, me: int):
        for n in names:
            c = self.pins.setdefault(n, Counter())
            c[me] += delta
            if c[me] <= 0:
                del c[me]
            if not c:
                del self.pins[n]

    def check_unpinned(self, name: str, doing: str, *, other_threads_only: bool = False):
        me = threading.get_ident()
        users = {t: c for t, c in self.pins.get(name, {}).items() if not (other_threads_only and t == me)}
        if users:
            where = "another thread" if other_threads_only else "this thread or another"
            raise ServeError(f"cannot {doing} patch {name!r}: {sum(users.values())} active route block(s) in "
                             f"{where} use it; load the new version under a new name and route to it, or wait "
                             "for those blocks to end")


def _state(model: nn.Module) -> _Served:
    st = model.__dict__.get(_STATE)
    if st is None:
        raise ServeError("this model has no patched layers: call portllm.serve.attach(model, patches) first")
    return st


def _check_attached(model: nn.Module, st: _Served):
    if model.__dict__.get(_STATE) is not st:
        raise ServeError("this model was detached (by another thread?) while the call waited")


def _as_patch(name: str, patch) -> Patch:
    if isinstance(patch, (str, os.PathLike)):
        patch = Patch.load(patch)
    if not isinstance(patch, Patch):
        raise TypeError(f"patch {name!r}: expected a portllm.Patch or a patch directory, got {type(patch).__name__}")
    if patch.expert_factors:
        first = sorted(patch.expert_factors)[0]
        raise ServeError(f"patch {name!r}: it holds LoRA on mixture-of-experts parameters ({first}, "
                         f"{len(patch.expert_factors)} in all), which portllm.serve does not serve yet; merge it "
                         "with portllm.apply_patch or portllm port instead")
    return patch


def _check_fits(st: _Served, name: str, patch: Patch, model: nn.Module):
    for module, m in patch.items():
        if not math.isfinite(m.scale):
            raise ServeError(f"patch {name!r}: module {module}: scale {m.scale} is not finite")
        for which, t in (("lora_B", m.B), ("lora_A", m.A)):
            if not bool(torch.isfinite(t).all()):
                raise ServeError(f"patch {name!r}: module {module}: {which} holds NaN or Inf values")
        layer = st.layers.get(module)
        if layer is None:
            try:
                kind = type(model.get_submodule(module)).__name__
                why = (f"this {kind} is not one of the patched layers (attach with target_modules= naming all the "
                       "layers the patches will need)")
            except AttributeError:
                why = "the model has no such module"
            raise ServeError(f"patch {name!r}: module {module}: {why}")
        if m.fan_in_fan_out:
            raise ServeError(f"patch {name!r}: module {module} is marked fan_in_fan_out (a Conv1D weight); "
                             "PatchedLinear serves nn.Linear layers")
        want = (layer.out_features, layer.in_features)
        if m.weight_shape != want:
            raise ServeError(f"patch {name!r}: module {module} needs a weight of shape {m.weight_shape}, "
                             f"the model's is {want}")
        if m.rank > st.max_rank:
            raise ServeError(f"patch {name!r}: module {module} has rank {m.rank}, above max_rank={st.max_rank} "
                             "(attach with a larger max_rank)")


def attach(model: nn.Module, patches: Mapping[str, Patch | str | os.PathLike], *, max_patches: int | None = None,
           max_rank: int | None = None, target_modules: Sequence[str] | None = None,
           backend: str | None = None) -> nn.Module:
    """Replaces the target ``nn.Linear`` layers of ``model`` by ``PatchedLinear`` layers (in place;
    returns the model) and loads ``patches`` (name -> ``Patch`` or patch directory) into slots.

    Targets: ``target_modules`` (as PEFT's: a regex string, or full names or dotted suffixes;
    ``portllm.targets``), else every module some patch names. ``max_patches`` (default: the number of patches, at least 1) and ``max_rank``
    (default: the largest rank of the patches) size the preallocated slots; patches of lower rank
    are zero-padded. Slot factors are kept in each layer's weight dtype. ``backend`` (``reference``,
    ``cpp``, ``triton``, ``cuda``; default: ``PORTLLM_BACKEND``, else the fastest measured on the
    device) runs the serving ops of every patched layer; one that cannot run there is refused here.
    """
    if _STATE in model.__dict__:
        raise ServeError("this model already has patched layers; use portllm.serve.load to add patches, or "
                         "detach first")
    if not isinstance(patches, Mapping):
        raise TypeError("patches must map names to patches: {'alice': 'path/to/adapter', ...}")
    loaded = {}
    for name, p in patches.items():
        if not isinstance(name, str) or not name:
            raise ServeError(f"patch names must be non-empty strings, got {name!r}")
        loaded[name] = resolve_fan_in_fan_out(model, _as_patch(name, p))
    if max_patches is None:
        max_patches = max(1, len(loaded))
    if max_rank is None:
        max_rank = max((m.rank for p in loaded.values() for m in p.modules.values()), default=0)
    if max_patches < 1 or max_rank < 1:
        raise ServeError(f"max_patches and max_rank must be at least 1 (got {max_patches}, {max_rank}; "
                         "with no patches, give both)")
    if len(loaded) > max_patches:
        raise ServeError(f"{len(loaded)} patches but max_patches={max_patches} slots")
    if target_modules is not None:
        targets = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and matches(n, target_modules)]
        if not targets:
            raise ServeError(f"the model has no nn.Linear modules {describe(target_modules)}")
    else:
        targets = sorted({n for p in loaded.values() for n in p.modules})
        if not targets:
            raise ServeError("nothing to attach: give patches, or target_modules= naming the layers to patch later")
    routing = Routing()
    layers = {}
    for n in targets:
        try:
            mod = model.get_submodule(n)
        except AttributeError:
            owner = next(k for k, p in loaded.items() if n in p.modules)
            raise ServeError(f"patch {owner!r}: module {n}: the model has no such module") from None
        if not isinstance(mod, nn.Linear):
            owner = next((k for k, p in loaded.items() if n in p.modules), None)
            raise ServeError(f"{'patch ' + repr(owner) + ': ' if owner else ''}module {n}: it is a "
                             f"{type(mod).__name__}; PatchedLinear serves nn.Linear layers")
        layers[n] = mod
    if backend is not None:
        from portllm import ops

        for dev in sorted({str(mod.weight.device) for mod in layers.values()}):
            for op in ("lora_shrink", "lora_expand_"):
                ops.resolve_backend(backend, torch.device(dev), op)  # a clear error before any change
    st = _Served({}, int(max_patches), int(max_rank), routing)
    st.layers = {n: PatchedLinear(mod, max_patches, max_rank, routing) for n, mod in layers.items()}
    for layer in st.layers.values():
        layer.backend = backend
    for name, p in loaded.items():  # everything checked before the model changes
        _check_fits(st, name, p, model)
    for n, layer in st.layers.items():
        model.set_submodule(n, layer)
    model.__dict__[_STATE] = st
    for name, p in loaded.items():
        _fill(st, name, p, len(st.slots))
    return model


def _fill(st: _Served, name: str, patch: Patch, slot: int):
    for module, layer in st.layers.items():
        m = patch.modules.get(module)
        if m is None:
            layer.set_slot(slot, None, None)
        else:
            layer.set_slot(slot, m.B, m.A, m.scale)
    st.slots[name] = slot


def load(model: nn.Module, name: str, patch: Patch | str | os.PathLike) -> nn.Module:
    """Loads ``patch`` under ``name``: into the slot of the patch of that name (replacing it), else
    into a free slot. Copies into the preallocated buffers, so compiled models and CUDA graphs keep
    running. Raises ``ServeError`` (before any change) if the patch does not fit or no slot is free."""
    st = _state(model)
    if not isinstance(name, str) or not name:
        raise ServeError(f"patch names must be non-empty strings, got {name!r}")
    p = resolve_fan_in_fan_out(model, _as_patch(name, patch))
    _check_fits(st, name, p, model)
    with st.lock:
        _check_attached(model, st)
        if name in st.slots:
            # Replacing in place while this thread's own blocks route to it is the hot swap (between two
            # of its forwards; CUDA graphs replay it); while another thread's forward may run, refused.
            st.check_unpinned(name, "replace", other_threads_only=True)
            slot = st.slots[name]
        else:
            free = sorted(set(range(st.max_patches)) - set(st.slots.values()))
            if not free:
                raise ServeError(f"cannot load patch {name!r}: all max_patches={st.max_patches} slots hold patches "
                                 f"({', '.join(st.slots)}); unload one first")
            slot = free[0]
        _fill(st, name, p, slot)
    return model


def unload(model: nn.Module, name: str) -> nn.Module:
    """Frees the slot of patch ``name`` (zeroes it)."""
    st = _state(model)
    with st.lock:
        _check_attached(model, st)
        if name not in st.slots:
            raise ServeError(f"no patch named {name!r} is loaded (loaded: {', '.join(st.slots) or 'none'})")
        st.check_unpinned(name, "unload")
        slot = st.slots.pop(name)
        for layer in st.layers.values():
            layer.set_slot(slot, None, None)
    return model


def loaded(model: nn.Module) -> dict[str, int]:
    """Loaded patch names and their slots."""
    st = _state(model)
    with st.lock:
        return dict(st.slots)


def detach(model: nn.Module) -> nn.Module:
    """Puts the original ``nn.Linear`` layers back (the same objects, whose weights were never
    changed) and drops the slots; returns the model."""
    st = _state(model)
    with st.lock:
        _check_attached(model, st)
        busy = sorted(st.pins)
        if busy:
            raise ServeError(f"cannot detach: active route blocks use {', '.join(busy)}")
        for n, layer in st.layers.items():
            model.set_submodule(n, layer.base_layer)
        del model.__dict__[_STATE]
    return model


@contextmanager
def route(model: nn.Module, names: Sequence[str | None] | str | None) -> Iterator[None]:
    """Inside the block, every forward of ``model`` (``model.generate`` included) sends the tokens of
    row i of the batch through patch ``names[i]`` (None: the base model). A single name (or None)
    applies to every row. Blocks nest; the previous routing comes back on exit. The routing is this
    thread's only, and the patches named are pinned until the block ends (see the module's notes
    on threads).

    A forward captured in a CUDA graph inside the block keeps that block's routing (which rows go
    to which slot); what the slots hold can change under it (``load``/``unload``), the routing
    cannot: capture one graph per routing."""
    st = _state(model)
    if names is None or isinstance(names, str):
        names_list = None
        single = names
    else:
        names_list = list(names)
        single = None
    device = next(iter(st.layers.values())).weight.device if st.layers else torch.device("cpu")

    def slot_of(n):
        if n is None:
            return -1
        if n not in st.slots:
            raise ServeError(f"route: no patch named {n!r} is loaded (loaded: {', '.join(st.slots) or 'none'})")
        return st.slots[n]

    with st.lock:  # names resolved and pinned together: no unload can come between
        _check_attached(model, st)
        if names_list is None:
            slot = slot_of(single)
            rows = _AllRows(slot, device)
            used = [single] if single is not None else []
        else:
            if not names_list:
                raise ServeError("route: names is empty; give one name (or None) per row of the batch")
            rows = torch.tensor([slot_of(n) for n in names_list], dtype=torch.int64, device=device)
            used = sorted({n for n in names_list if n is not None})
        me = threading.get_ident()  # the block's thread, also if it is left from another one
        st.pin(used, +1, me)
    try:
        prev = (st.routing.rows, st.routing.names, st.routing.expand)
        st.routing.set(rows, names)
        try:
            yield
        finally:
            st.routing.set(*prev)
    finally:
        with st.lock:
            st.pin(used, -1, me)


class _AllRows:
    """The same slot for every row, whatever the batch size (``route(model, "alice")``)."""

    def __init__(self, slot: int, device):
        self.slot, self.device = slot, device

    def for_batch(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.slot, dtype=torch.int64, device=self.device)
