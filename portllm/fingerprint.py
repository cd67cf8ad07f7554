"""Sketches of weights: enough to tell whether a model is the one a patch was made from, and how far
another model's weights have moved from it, without keeping the weights.

A sketch of a weight W is its shape, its Frobenius norm and ``SAMPLE`` of its elements at fixed,
evenly spaced positions. Two models with equal samples are taken to be the same; otherwise
``‖W'[s] − W[s]‖ / ‖W[s]‖`` over the sampled elements estimates the relative change ‖W' − W‖/‖W‖.
"""

from __future__ import annotations

import hashlib
import json

import torch

SAMPLE = 64


def sample_positions(numel: int) -> torch.Tensor:
    if numel == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, numel - 1, min(SAMPLE, numel), dtype=torch.float64).round().long()


def sketch(W: torch.Tensor) -> dict:
    flat = W.detach().reshape(-1)
    sample = flat[sample_positions(flat.numel()).to(flat.device)].double().cpu()
    return {"shape": list(W.shape), "norm": float(torch.linalg.vector_norm(flat.double()).item()),
            "sample": sample.tolist()}


def fingerprint(sketches: dict[str, dict]) -> str:
    """A short hash of a set of sketches (names, shapes and sampled values)."""
    canon = json.dumps({k: [v["shape"], v["sample"]] for k, v in sorted(sketches.items())}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def same_weights(sk: dict, sample: list[float]) -> bool:
    """Whether a weight whose sampled elements are ``sample`` is the sketched one."""
    return sample == sk["sample"]


def relative_change(sk: dict, sample: list[float]) -> float:
    """Estimated ‖W − W_base‖ / ‖W_base‖ from the sampled elements of W."""
    now = torch.tensor(sample, dtype=torch.float64)
    then = torch.tensor(sk["sample"], dtype=torch.float64)
    denom = then.norm().item()
    return (now - then).norm().item() / denom if denom > 0 else float("inf") if (now != then).any() else 0.0


def content_hash(W: torch.Tensor, chunk_bytes: int = 64 << 20) -> str:
    """SHA-256 of a weight's dtype, shape and bytes (row-major), read in chunks (a GPU weight is
    copied to the host a chunk at a time). Equal hashes mean equal weights, bit for bit; any change
    to any element changes it (the chance that a changed weight keeps its hash is about 2^-256)."""
    h = hashlib.sha256(f"{W.dtype}|{list(W.shape)}|".encode())
    flat = W.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    for i in range(0, raw.numel(), chunk_bytes):
        h.update(raw[i : i + chunk_bytes].cpu().numpy().tobytes())
    return h.hexdigest()
