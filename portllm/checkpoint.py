"""Weights by name, from an in-memory model or a checkpoint directory, without loading them all.

A checkpoint directory is what ``save_pretrained`` writes: ``config.json`` and either
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. Tensor keys are module
names plus ``.weight`` (``model.layers.0.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import json
import os
import re

import torch

from portllm import fingerprint as fp
from portllm.atomic import UnsafePathError, safe_join
from portllm.files import InputChangedError, InputWatch, NotARegularFileError, link_scope, open_regular
from portllm.safetensors_io import SafetensorsError, SafetensorsReader

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory portllm cannot read; the message names the directory or file."""


_INDEXED = re.compile(r"^(?P<key>.+)\[(?P<index>\d+)\]$")


def weight_key(module: str) -> str:
    """The tensor a patch module updates: ``<module>.weight``; an indexed name ``P[e]`` (expert e of the
    fused 3-D parameter P, ``portllm.experts``) stays as it is."""
    return module if _INDEXED.match(module) else module + ".weight"


def tensor_target(key: str) -> tuple[str, int | None]:
    """(tensor key, index) of a weight key: ``("P", e)`` for ``"P[e]"``, else ``(key, None)``."""
    m = _INDEXED.match(key)
    return (m["key"], int(m["index"])) if m else (key, None)


class Checkpoint:
    """A safetensors checkpoint directory: shapes, sampled elements and whole tensors by key."""

    def __init__(self, path: str, *, allow_pmss: bool = False):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        index = os.path.join(self.path, INDEX)
        self.watch = InputWatch()  # every file read, to prove at the end that none changed meanwhile
        if os.path.lexists(index):
            try:
                with open_regular(index, "shard index") as f:
                    self.watch.add_fd(index, f)
                    self.index = json.load(f)
            except NotARegularFileError as e:
                raise CheckpointError(str(e)) from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise CheckpointError(f"{index}: cannot read the shard index ({e})") from None
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: \"weight_map\" must be an object of tensor name -> shard file name")
            self.files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.path, SINGLE)):
            self.index = None
            self.files = [SINGLE]
        else:
            pickled = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = (f"; it has pickled weights ({pickled[0]}), which portllm refuses to unpickle: "
                    "re-save the model with save_pretrained(..., safe_serialization=True)") if pickled else ""
            raise CheckpointError(f"{self.path}: no {SINGLE} or {INDEX}{hint}")
        self._readers: dict[str, SafetensorsReader] = {}
        self.key_file: dict[str, str] = {}
        for fname in self.files:
            try:
                full = safe_join(self.path, fname, what=f"{INDEX if self.index is not None else 'shard'}: shard name",
                                 scope=link_scope(self.path))
            except UnsafePathError as e:
                raise CheckpointError(f"{self.path}: {e}") from None
            if not os.path.exists(full):
                self.close()
                raise CheckpointError(f"{self.path}: the index lists {fname}, which is missing")
            try:
                rd = SafetensorsReader(full)
            except SafetensorsError as e:
                self.close()
                raise CheckpointError(str(e)) from None
            self._readers[fname] = rd
            self.watch.add(full, rd.stat)
            for k in rd.keys():
                if k in self.key_file:
                    self.close()
                    raise CheckpointError(f"{self.path}: tensor {k!r} is in two shards, {self.key_file[k]} and "
                                          f"{fname}; refusing to guess which one is meant")
                self.key_file[k] = fname
        pmss = [k for k in self.key_file if k.endswith(".U") and k[:-2] + ".I" in self.key_file
                and k[:-2] + ".J" in self.key_file]
        if pmss and not allow_pmss:
            self.close()
            raise CheckpointError(
                f"{self.path}: holds PMSS fine-tuning keys ({pmss[0]}, ...: {len(pmss)} modules), a PMSS model as "
                "the HF Trainer or save_pretrained writes it; its weights are the base's. Load it with "
                "from_pretrained, then portllm.pmss.load(model, this directory); or merge it "
                "(portllm.pmss.merge) and save_pretrained the result")
        if self.index is not None:
            missing = [k for k, f in weight_map.items() if k not in self.key_file]
            if missing:
                self.close()
                raise CheckpointError(f"{index}: lists {missing[0]!r} in {weight_map[missing[0]]}, "
                                      f"which does not hold it ({len(missing)} such)")

    def close(self):
        for rd in self._readers.values():
            rd.close()

    def check_unchanged(self):
        """InputChangedError if any file of the checkpoint read so far was replaced, rewritten or
        resized since it was opened, or a shard's header no longer reads the same."""
        self.watch.check()
        for fname, rd in self._readers.items():
            if not rd.header_unchanged():
                raise InputChangedError(f"input {rd.path} was rewritten while it was being read (its header "
                                        "changed); nothing was written: run again once it is stable")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self) -> list[str]:
        return list(self.key_file)

    def info(self, key: str):
        return self._readers[self.key_file[key]].tensors[key]

    def reader(self, fname: str) -> SafetensorsReader:
        return self._readers[fname]

    def shape(self, key: str) -> tuple[int, ...] | None:
        key, index = tensor_target(key)
        if key not in self.key_file:
            return None
        shape = tuple(self.info(key).shape)
        if index is None:
            return shape
        return shape[1:] if len(shape) == 3 and index < shape[0] else None

    def tensor(self, key: str) -> torch.Tensor:
        key, index = tensor_target(key)
        t = self._readers[self.key_file[key]][key]
        return t if index is None else t[index]

    def sample(self, key: str) -> list[float]:
        """The elements fingerprint.sketch samples, read one by one (no whole-tensor read)."""
        key, index = tensor_target(key)
        info = self.info(key)
        numel = torch.Size(info.shape).numel()
        offset = 0
        if index is not None:
            numel //= info.shape[0]
            offset = index * numel
        positions = (fp.sample_positions(numel) + offset).tolist()
        return self._readers[self.key_file[key]].elements(key, positions).double().tolist()


class ModelWeights:
    """The same interface over an nn.Module: weights of its submodules by key."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._params = dict(model.named_parameters(remove_duplicate=False))

    def keys(self) -> list[str]:
        return list(self._params)

    def shape(self, key: str) -> tuple[int, ...] | None:
        key, index = tensor_target(key)
        p = self._params.get(key)
        if p is None:
            return None
        if index is None:
            return tuple(p.shape)
        return tuple(p.shape[1:]) if p.dim() == 3 and index < p.shape[0] else None

    def tensor(self, key: str) -> torch.Tensor:
        key, index = tensor_target(key)
        p = self._params[key].detach()
        return p if index is None else p[index]

    def sample(self, key: str) -> list[float]:
        return fp.sketch(self.tensor(key))["sample"]


def weights(source) -> Checkpoint | ModelWeights:
    """A Checkpoint for a directory, ModelWeights for a module."""
    if isinstance(source, torch.nn.Module):
        return ModelWeights(source)
    if isinstance(source, (str, os.PathLike)):
        return Checkpoint(source)
    raise TypeError(f"expected a model (nn.Module) or a checkpoint directory, got {type(source).__name__}")

