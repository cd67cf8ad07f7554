"""PMSS on transformers models: inject, save/load, merge, and export as a portable patch."""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from portllm import fingerprint as fp
from portllm._version import __version__
from portllm.merge import prepare_merge
from portllm.patch import Patch, PatchModule
from portllm.pmss import sharded
from portllm.pmss.layer import PMSSLinear, check_indices
from portllm.pmss.select import select_skeleton
from portllm.safetensors_io import SafetensorsError, SafetensorsReader, write_tensors
from portllm.targets import describe, matches

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PMSSLoadError(ValueError):
    """A PMSS file that does not belong to this model (or is not a PMSS file)."""


def _targets(model: nn.Module, target_modules) -> list[str]:
    targets = target_modules if target_modules is not None else DEFAULT_TARGETS
    names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and matches(name, targets)]
    if not names:
        raise ValueError(f"the model has no nn.Linear modules {describe(targets)}; pass target_modules=")
    return names


def pmss_modules(model: nn.Module) -> dict[str, PMSSLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, PMSSLinear)}


def _selection_batch(W: torch.Tensor, rank: int) -> int:
    """How many weights shaped like W one batched selection takes: what fits in a quarter of the
    device's free memory (on a GPU), or in 256 MiB (on a CPU, where batching saves little). Per
    weight: its fp32 copy, the randomized SVD's two bases and DEIM's fp64 working copies, with a
    factor 2 for temporaries."""
    m, n = W.shape
    q = rank + 10
    per = 2 * (4 * m * n + 4 * q * (m + n) + 8 * rank * (m + n))
    if W.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(W.device)
        budget = max(256 << 20, free // 4)
    else:
        budget = 256 << 20
    return max(1, budget // per)


def inject(model: nn.Module, rank: int, target_modules=None, method: str = "deim", scale: float = 1.0, *,
           seed: int = 0, backend: str | None = None) -> nn.Module:
    """Replaces each target ``nn.Linear`` with a ``PMSSLinear`` of the given rank (skeleton selected
    from its weight by ``method``, on the weight's device; equal shapes are selected as one batch)
    and freezes everything else: afterwards the U's are the model's only trainable parameters.
    ``backend``: how the layers run the skeleton products (``portllm.pmss.layer.resolve_backend``):
    ``"gemm"`` (the default) or a ``skeleton_mm`` backend. Returns the model."""
    names = _targets(model, target_modules)
    wrapped = sharded.fsdp_module(model)
    if wrapped is not None or any(sharded.is_sharded(model.get_submodule(n).weight) for n in names):
        raise ValueError(f"module {wrapped or 'the root'} is already sharded by FSDP2 (fully_shard ran): call "
                         "portllm.pmss.inject before fully_shard, so that the skeleton is selected from the whole "
                         "weight and FSDP2 shards U with the other parameters")
    by_shape: dict[tuple, list[str]] = {}
    for name in names:
        by_shape.setdefault(tuple(model.get_submodule(name).weight.shape), []).append(name)
    for p in model.parameters():
        p.requires_grad_(False)
    for shape, group in by_shape.items():
        per_batch = _selection_batch(model.get_submodule(group[0]).weight, rank)
        for b0 in range(0, len(group), per_batch):
            names_b = group[b0 : b0 + per_batch]
            Ws = torch.stack([model.get_submodule(n).weight.detach() for n in names_b])
            I, J = select_skeleton(Ws, rank, method, seed=seed)
            del Ws
            for k, name in enumerate(names_b):
                model.set_submodule(name, PMSSLinear(model.get_submodule(name), I[k], J[k], scale, backend))
    return model


def save(model: nn.Module, path: str, *, overwrite: bool = False) -> str:
    """Writes only what PMSS trained and needs: per module I, J, U, and rank, scale, a sketch and the
    SHA-256 of the base weight, as one safetensors file at ``path``. Written whole to a temporary
    name beside it and renamed into place, so an interrupted save leaves nothing (or the previous
    file) under ``path``. An existing file is replaced only with ``overwrite=True``; a directory never.
    A model sharded by FSDP2: every rank calls it (the weights and U are gathered); rank 0 writes,
    the others return once the file is in place (``portllm.pmss.sharded``)."""
    path = os.fspath(path)
    mods = pmss_modules(model)
    shard = sharded.any_sharded(model)
    if shard:
        sharded.reshard_all(model)

    def check():
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory: pmss.save writes one file; give a file name such as "
                                    f"{os.path.join(path, 'pmss.safetensors')}")
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        if not mods:
            raise ValueError("the model has no PMSSLinear modules (call portllm.pmss.inject first)")

    sharded.on_rank0(check) if shard else check()
    tensors, info = {}, {}
    for name, m in mods.items():
        W = sharded.full(m.weight.detach())
        tensors[f"{name}.I"] = m.I.cpu()
        tensors[f"{name}.J"] = m.J.cpu()
        tensors[f"{name}.U"] = sharded.full(m.U.detach()).cpu()
        info[name] = {"rank": m.rank, "scale": m.scale, "sketch": fp.sketch(W), "sha256": fp.content_hash(W)}

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_tensors(path, tensors, {"format": "pt",
                                      "portllm_pmss": json.dumps({"version": __version__, "modules": info})})

    if shard:
        sharded.on_rank0(write)  # (a failed write raises on every rank)
        sharded.barrier()
    else:
        write()
    return path


def _load_trainer_dir(model: nn.Module, path: str, backend: str | None) -> nn.Module:
    """A directory the HF Trainer (``save_model``, checkpoints) or ``save_pretrained`` wrote from a
    PMSS model: its state dict holds each PMSSLinear's base ``weight`` and its ``I``, ``J``, ``U``,
    ``s``. The model's weights must equal those base weights."""
    from portllm.checkpoint import Checkpoint, CheckpointError

    try:
        ckpt = Checkpoint(path, allow_pmss=True)
    except CheckpointError as e:
        raise PMSSLoadError(str(e)) from None
    with ckpt:
        keys = set(ckpt.keys())
        names = sorted(k[:-2] for k in keys if k.endswith(".U") and {k[:-2] + ".I", k[:-2] + ".J"} <= keys)
        if not names:
            raise PMSSLoadError(f"{path}: no PMSS keys (MODULE.U, .I, .J) in this checkpoint and no PMSS file: "
                                "not a PMSS fine-tune")
        found = {}
        for name in names:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise PMSSLoadError(f"{path}: the model has no module {name}") from None
            base = mod.restored_base() if isinstance(mod, PMSSLinear) else mod
            if not isinstance(base, nn.Linear):
                raise PMSSLoadError(f"{path}: {name} is a {type(base).__name__}, not a Linear layer")
            if f"{name}.weight" in keys and not torch.equal(ckpt.tensor(f"{name}.weight").to(base.weight.device),
                                                            base.weight.detach()):
                raise PMSSLoadError(f"{path}: the weights of {name} are not the base weights this PMSS fine-tune "
                                    "was trained on (load the model from this same directory with from_pretrained)")
            U = ckpt.tensor(f"{name}.U")
            s = float(ckpt.tensor(f"{name}.s")) if f"{name}.s" in keys else 1.0
            if not math.isfinite(s) or not U.is_floating_point() or not bool(torch.isfinite(U).all()):
                raise PMSSLoadError(f"{path}: module {name}: the scale or U holds NaN or Inf values")
            found[name] = (base, ckpt.tensor(f"{name}.I"), ckpt.tensor(f"{name}.J"), U, s, mod)
    for name, (base, I, J, U, s, mod) in found.items():
        model.set_submodule(name, PMSSLinear(base, I, J, s, backend if backend is not None else
                                             getattr(mod, "backend", None), U=U))
    return model


def load(model: nn.Module, path: str, *, backend: str | None = None) -> nn.Module:
    """Puts a saved PMSS fine-tune onto ``model`` (plain or already injected): a file ``pmss.save``
    wrote, or a directory the HF Trainer or ``save_pretrained`` wrote from a PMSS model (load the
    model from that directory with ``from_pretrained`` first: it holds the base weights). The base
    weights must be those the skeleton was selected from; otherwise ``PMSSLoadError`` (use
    ``to_patch`` to carry a PMSS fine-tune to other weights)."""
    shard = sharded.any_sharded(model)
    if os.path.isdir(os.fspath(path)):
        if shard:
            raise PMSSLoadError(f"{path}: a Trainer directory cannot be loaded into a model sharded by FSDP2; load "
                                "it before fully_shard, or load a pmss.save file")
        return _load_trainer_dir(model, os.fspath(path), backend)
    if shard:
        sharded.reshard_all(model)  # (parameters FSDP2 left whole after a forward would be freed over a copy)
        info, tensors, bases = sharded.on_every_rank(lambda: _read_pmss_file(model, path, shard))
    else:
        info, tensors, bases = _read_pmss_file(model, path, shard)
    bad = []
    for name, mi in info.items():
        W = sharded.full(bases[name].weight.detach())  # (a collective where sharded: every rank, in order)
        # Files since 0.1.0 carry the weights' SHA-256: any changed element is caught. Older files only
        # a 64-element sample, which misses changes elsewhere.
        same = list(W.shape) == mi["sketch"]["shape"] and (
            fp.content_hash(W) == mi["sha256"] if "sha256" in mi else fp.same_weights(mi["sketch"], fp.sketch(W)["sample"]))
        if not same:
            bad.append(name)

    def verdict():
        if bad:
            raise PMSSLoadError(
                f"{path}: the weights of {bad[0]} are not the ones this PMSS skeleton was selected from "
                "(its indices I, J point into those weights). To carry the fine-tune to other weights, "
                "export it with portllm.pmss.to_patch(model) on the original model and port the patch.")

    sharded.on_every_rank(verdict) if shard else verdict()
    if shard:  # in place: FSDP2 holds these layers and their parameters
        for name, mi in info.items():
            mod = bases[name]
            for part in ("I", "J"):
                sharded.copy_into_(getattr(mod, part), tensors[f"{name}.{part}"])
            sharded.copy_into_(mod.U, tensors[f"{name}.U"])
            mod.s.fill_(float(mi["scale"]))
            mod.scale = float(mi["scale"])
        return model
    for name, mi in info.items():
        mod = model.get_submodule(name)
        base = mod.restored_base() if isinstance(mod, PMSSLinear) else mod
        new = PMSSLinear(base, tensors[f"{name}.I"], tensors[f"{name}.J"], mi["scale"],
                         backend if backend is not None else getattr(mod, "backend", None), U=tensors[f"{name}.U"])
        model.set_submodule(name, new)
    return model


def _read_pmss_file(model: nn.Module, path, shard: bool):
    """(modules' metadata, tensors, the layers they go into) of a pmss.save file, every check that needs
    no collective done (on a sharded model: the layers' ranks, and I, J as PMSSLinear checks them)."""
    try:
        with SafetensorsReader(os.fspath(path)) as rd:
            meta = rd.metadata.get("portllm_pmss")
            if meta is None:
                raise PMSSLoadError(f"{path}: not a portllm PMSS file (no portllm_pmss metadata)")
            try:
                info = json.loads(meta)["modules"]
                if not isinstance(info, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise PMSSLoadError(f"{path}: corrupt portllm_pmss metadata") from None
            tensors = {k: rd[k] for k in rd.keys()}
    except SafetensorsError as e:
        raise PMSSLoadError(str(e)) from None
    bases = {}
    for name in info:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise PMSSLoadError(f"{path}: the model has no module {name}") from None
        if shard and not isinstance(mod, PMSSLinear):
            raise PMSSLoadError(f"{path}: module {name} of this sharded model is not a PMSSLinear: under FSDP2, "
                                "pmss.load puts the fine-tune into layers pmss.inject made before fully_shard")
        bases[name] = mod if shard else (mod.restored_base() if isinstance(mod, PMSSLinear) else mod)
        if shard:
            continue
        if not isinstance(bases[name], nn.Linear):
            raise PMSSLoadError(f"{path}: {name} is a {type(bases[name]).__name__}, not a Linear layer")
    for name, mi in info.items():
        if not isinstance(mi, dict):
            raise PMSSLoadError(f"{path}: module {name}: corrupt portllm_pmss metadata")
        scale = mi.get("scale")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise PMSSLoadError(f"{path}: module {name}: scale {scale!r} is not a finite number")
        for part in ("I", "J", "U"):
            if f"{name}.{part}" not in tensors:
                raise PMSSLoadError(f"{path}: module {name}: tensor {name}.{part} is missing")
        U = tensors[f"{name}.U"]
        if not U.is_floating_point() or not bool(torch.isfinite(U).all()):
            raise PMSSLoadError(f"{path}: module {name}: U holds NaN or Inf values (or is not floating point)")
    if shard:
        for name in info:
            mod = bases[name]
            I, J, U = tensors[f"{name}.I"], tensors[f"{name}.J"], tensors[f"{name}.U"]
            if I.shape != mod.I.shape or J.shape != mod.J.shape or tuple(U.shape) != tuple(mod.U.shape):
                raise PMSSLoadError(f"{path}: module {name} has rank {I.numel()} in the file, {mod.rank} in the model "
                                    "(inject the same rank before fully_shard)")
            try:
                check_indices(I, J, *mod.weight.shape)
            except (TypeError, ValueError) as e:
                raise PMSSLoadError(f"{path}: module {name}: {e}") from None
    return info, tensors, bases


def _factors(m: PMSSLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """B = C·U (fp32) and A = R: gathered copies, read before W changes (of the whole W and U where
    FSDP2 shards them: a collective)."""
    W = sharded.full(m.weight.detach())
    C = W.index_select(1, m.J).float()
    R = W.index_select(0, m.I).clone()
    return C @ sharded.full(m.U.detach()).float(), R


def merge(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """W += s·C·U·R in place for every PMSSLinear (C and R gathered before W is written), then puts
    the plain Linear layers back. Returns the model."""
    # All or nothing: every module's factors are gathered and its merge checked (NaN/Inf, overflow)
    # before any weight is written.
    mods = pmss_modules(model)
    if sharded.any_sharded(model):
        raise ValueError(f"module {sharded.fsdp_module(model) or 'the root'} is sharded by FSDP2, which holds the PMSS "
                         "layers merge would replace; take the merged weights with portllm.pmss.merged_state_dict(model) "
                         "(every rank calls it), or pmss.save on every rank and merge the file on one process")
    merges = []
    for name, m in mods.items():
        B, A = _factors(m)
        merges.append(prepare_merge(m.weight.data, [(PatchModule(B, A, m.scale), 1.0)], backend=backend, name=name))
    for run in merges:
        run()
    for name, m in mods.items():
        model.set_submodule(name, m.restored_base())
    return model


def to_patch(model: nn.Module) -> Patch:
    """The PMSS update as a portable low-rank Patch: B = s·C·U, A = R per module, with sketches of
    the base weights; it ports onto an evolved model like a LoRA patch."""
    mods = {}
    sketches = {}
    if sharded.any_sharded(model):
        sharded.reshard_all(model)
    for name, m in pmss_modules(model).items():
        B, A = _factors(m)
        mods[name] = PatchModule((m.scale * B).contiguous(), A.float().contiguous(), 1.0)
        sketches[name] = fp.sketch(sharded.full(m.weight.detach()))
    if not mods:
        raise ValueError("the model has no PMSSLinear modules")
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return Patch(mods, base_model=base, base_sketches=sketches, source="pmss")


def merged_state_dict(model: nn.Module, *, rank0_only: bool = True, backend: str | None = None) -> dict:
    """The state dict ``merge`` would leave, as whole CPU tensors: every PMSSLinear's weight with
    W + s·C·U·R merged (by the same kernels and checks as ``merge``) and its I, J, U, s left out; every
    other entry as it is. For a model sharded by FSDP2 every rank calls it (each tensor is gathered in
    turn); with ``rank0_only`` the other ranks return an empty dict (save it from rank 0, e.g.
    ``save_pretrained(dir, state_dict=sd)``). The model is not modified."""
    mods = pmss_modules(model)
    if sharded.any_sharded(model):
        sharded.reshard_all(model)
    keep = sharded.is_rank0() or not rank0_only
    extra = {f"{name}.{part}" for name in mods for part in ("I", "J", "U", "s")}
    out = {}
    for key, t in model.state_dict().items():
        if key in extra:
            continue
        t = sharded.full(t.detach() if isinstance(t, torch.Tensor) else t)
        if keep:
            out[key] = t.cpu().clone()
    factors = []
    for name, m in mods.items():
        B, A = _factors(m)  # (collective where sharded: every rank, in the same order)
        if keep:
            factors.append((name, B.cpu(), A.cpu(), m.scale))

    def merge_all():  # after every collective; all or nothing, as merge
        runs = [prepare_merge(out[f"{name}.weight"], [(PatchModule(B, A, s), 1.0)], backend=backend, name=name)
                for name, B, A, s in factors]
        for run in runs:
            run()

    sharded.on_every_rank(merge_all) if sharded.any_sharded(model) else merge_all()
    return out
