"""lora_tiles: the grouping of tokens by patch slot that a backend's serving kernels take, computed once
per batch and shared by every ``lora_shrink``/``lora_expand_`` call of a forward (Triton:
``kernels/lora_slots.py``; the other backends group tokens themselves)."""

from __future__ import annotations

import torch


def lora_tiles(slots: torch.Tensor, P: int, backend: str) -> torch.Tensor | None:
    """The token grouping the ``backend``'s serving kernels take (``slots`` [T] int64, P slots), to
    compute once and pass to every ``lora_shrink``/``lora_expand_`` call with these slots (every
    layer of a forward); None for the backends that group tokens themselves. Device-side ops only,
    no host synchronisation."""
    if backend != "triton":
        return None
    from portllm.kernels.lora_slots import token_tiles

    return token_tiles(slots.to(torch.int64), P)
