"""Small checkpoints and patches made in code (no transformers needed), and a way to prove that a
directory did not change: the fixtures of the safety tests."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from portllm.patch import Patch, PatchModule
from portllm.safetensors_io import write_tensors

MODULES = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]


def make_checkpoint(path, dtype=torch.bfloat16, shards=2, shape=(24, 40), seed=0, config=None) -> dict:
    """A sharded safetensors checkpoint of a few 2-D weights plus an embedding; returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {f"{m}.weight": torch.randn(*shape, generator=g).to(dtype) for m in MODULES}
    tensors["model.embed_tokens.weight"] = torch.randn(16, shape[1], generator=g).to(dtype)
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_tensors(os.path.join(path, fname), {n: tensors[n] for n in part}, {"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config or {"model_type": "llama", "torch_dtype": str(dtype).removeprefix("torch.")}, f)
    return tensors


def make_patch(shape=(24, 40), r=4, seed=1, scale=0.5, magnitude=0.1, modules=MODULES) -> Patch:
    g = torch.Generator().manual_seed(seed)
    mods = {m: PatchModule((torch.randn(shape[0], r, generator=g) * magnitude),
                           (torch.randn(r, shape[1], generator=g) * magnitude), scale) for m in modules}
    return Patch(mods, base_model="test")


def tree_digest(path) -> str:
    """Hash of every name, link target, mode and file content under path (symlinks not followed)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            if os.path.islink(full):
                h.update(b"L" + os.readlink(full).encode())
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def snapshot(*paths) -> dict:
    return {p: tree_digest(p) for p in paths}
