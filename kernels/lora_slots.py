"""Token grouping shared by the serving kernels (lora_shrink, lora_expand): tokens sorted by patch
slot, and the tiles of BLOCK_T tokens of one slot that the programs take.

Computed with a few device-side torch ops and no host synchronisation, so a forward that routes
tokens to patches can be captured in a CUDA graph: the grid is the bound cdiv(T, BLOCK_T) + P on
the number of tiles, and the programs past the last tile do nothing.
"""

import torch
import triton
import triton.language as tl


def block_t_for(T: int) -> int:
    """Tokens per tile: small tiles for decode-sized batches, larger ones for prefill."""
    return 16 if T <= 256 else 64


def token_tiles(slots: torch.Tensor, P: int) -> torch.Tensor:
    """slots [T] int64 (negative = no patch) -> the grouping, packed in one int64 tensor
    [T + 3P + 1] (``unpack`` splits it): ``order`` lists the tokens slot by slot (no-patch tokens
    last), slot p's tokens are order[seg_start[p] : seg_start[p] + seg_count[p]], and its tiles of
    ``block_t_for(T)`` tokens are the program ids tile_start[p] .. tile_start[p + 1] - 1. One
    grouping serves every layer of a forward (``portllm.serve`` computes it once per batch)."""
    block_t = block_t_for(slots.shape[0])
    key = torch.where(slots >= 0, slots, P)
    order = torch.argsort(key, stable=True)
    # (scatter_add_ into a fixed size, not bincount, which reads the largest key back to the host)
    counts = torch.zeros(P + 1, dtype=torch.int64, device=slots.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:P]
    seg_start = torch.cumsum(counts, 0) - counts
    tile_start = torch.zeros(P + 1, dtype=torch.int64, device=slots.device)
    tile_start[1:] = torch.cumsum((counts + block_t - 1) // block_t, 0)
    return torch.cat([order, seg_start, counts, tile_start])


def unpack(tiles: torch.Tensor, T: int, P: int):
    """(order, seg_start, seg_count, tile_start, block_t, grid) from ``token_tiles``' tensor; the
    grid is the bound cdiv(T, block_t) + P on the number of tiles."""
    order, seg_start, counts, tile_start = torch.split(tiles, [T, P, P, P + 1])
    block_t = block_t_for(T)
    return order, seg_start, counts, tile_start, block_t, triton.cdiv(T, block_t) + P


@triton.jit
def tile_of(pid, TILE_START, SEG_START, SEG_COUNT, P, BLOCK_T: tl.constexpr, P_POW2: tl.constexpr):
    """Program ``pid``'s slot and the positions in ``order`` of its tokens: (p, offs, mask); mask is
    all false for a program past the last tile."""
    offs_p = tl.arange(0, P_POW2)
    ends = tl.load(TILE_START + 1 + offs_p, mask=offs_p < P, other=2**62)
    p = tl.sum((ends <= pid).to(tl.int32), axis=0)
    live = p < P
    p = tl.minimum(p, P - 1)
    first = tl.load(SEG_START + p) + (pid - tl.load(TILE_START + p)) * BLOCK_T
    last = tl.load(SEG_START + p) + tl.load(SEG_COUNT + p)
    last = tl.where(live, last, first)  # a program past the last tile: an empty range
    offs = first + tl.arange(0, BLOCK_T)
    return p, offs, offs < last
