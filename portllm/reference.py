"""Pure-PyTorch reference implementations: the oracle every backend is tested against, and the
fallback wherever no kernel is available. Written from the math, for clarity first.
"""

from __future__ import annotations

import torch

# Rows are processed in chunks so the fp32 temporary stays bounded (1 Mi elements, 4 MiB: small
# enough to stay in cache, 2.8x faster than 32 MiB chunks for a 4096x14336 bf16 W on the CI machine)
# whatever the size of W: the reference is also the fallback used on real checkpoints.
_CHUNK_ELEMS = 1 << 20


def patch_add_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W[m, n] += B[m, r] · diag(scale[r]) · A[r, n], in place; returns W.

    Each element is computed as ``round(float32(W) + sum_k float32(B[i,k]·scale[k])·float32(A[k,j]))``:
    the factor product is formed in fp32 (B·scale rounded to fp32 first), accumulated in fp32, added
    to W in fp32, and rounded once to W's dtype (round-to-nearest-even). ``scale`` is a float32
    tensor of length r. Inputs are assumed valid (``portllm.ops.patch_add_`` checks them).
    """
    m, n = W.shape
    r = B.shape[1]
    if W.numel() == 0 or r == 0:
        return W
    Bs = B.to(torch.float32) * scale.to(torch.float32)[None, :]
    Af = A.to(torch.float32)  # (factors that alias W arrive as copies: portllm.ops.patch_add_)
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    for i in range(0, m, rows):
        w = W[i : i + rows]
        acc = torch.addmm(w.to(torch.float32), Bs[i : i + rows], Af)
        w.copy_(acc)
    return W


def patch_add_exact(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale) -> torch.Tensor:
    """W + B·diag(scale)·A computed in float64, not rounded: the ground truth for error bounds."""
    s = torch.as_tensor(scale, dtype=torch.float64, device=W.device)
    if s.dim() == 0:
        s = s.expand(B.shape[1])
    return W.double() + (B.double() * s[None, :]) @ A.double()



def skeleton_mm(A: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, kind: str) -> torch.Tensor:
    """Products with a skeleton of W [m, n], gathered by index, in A's dtype (fp32 accumulation):

    * ``"ct"``: A [T, r] @ W[:, idx]ᵀ -> [T, m]   (the C side of the forward, C = W[:, J])
    * ``"c"``:  A [T, m] @ W[:, idx]  -> [T, r]   (dy·C in the backward)
    * ``"r"``:  A [T, r] @ W[idx, :]  -> [T, n]   (the R side of the input gradient, R = W[I, :])
    """
    if kind == "ct":
        return A @ W.index_select(1, idx).t().to(A.dtype)
    if kind == "c":
        return A @ W.index_select(1, idx).to(A.dtype)
    if kind == "r":
        return A @ W.index_select(0, idx).to(A.dtype)
    raise ValueError(f"skeleton_mm: unknown kind {kind!r}")


def lora_shrink(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """h[t] = x[t] · A[slots[t]]ᵀ in fp32 (fp32 products, fp32 accumulation); 0 where slots[t] < 0.

    x [T, n], A [P, R, n] (one patch per slot, ranks padded with zeros), slots [T] int64 -> h [T, R].
    Tokens are grouped by slot, so each patch's factor is read once: the loop runs over the slots in
    use, not over tokens.
    """
    T, R = x.shape[0], A.shape[1]
    used = torch.unique(slots).tolist()
    if len(used) == 1 and used[0] >= 0:  # one patch for every row: no gather, no scatter
        return x.to(torch.float32) @ A[used[0]].to(torch.float32).t()
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    for p in (q for q in used if q >= 0):
        rows = (slots == p).nonzero().squeeze(1)
        h.index_copy_(0, rows, x.index_select(0, rows).to(torch.float32) @ A[p].to(torch.float32).t())
    return h


def lora_expand_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
    """y[t] ← round(fp32(y[t]) + scale[p] · (h[t] · B[p]ᵀ)) for p = slots[t] >= 0, in place; rows with
    slots[t] < 0 are not touched (bit for bit). y [T, m], h [T, R] fp32, B [P, m, R], scale [P] fp32.
    One rounding per element, to nearest even. (The sum runs in one addmm_ per patch: scale times
    the fp32 product, added to fp32 y.)"""
    used = torch.unique(slots).tolist()
    scales = scale.to(torch.float32).tolist()
    if len(used) == 1 and used[0] >= 0:  # one patch for every row: no gather, no scatter
        p = used[0]
        return y.copy_(y.to(torch.float32).addmm_(h, B[p].to(torch.float32).t(), alpha=scales[p]))
    for p in (q for q in used if q >= 0):
        rows = (slots == p).nonzero().squeeze(1)
        yp = y.index_select(0, rows).to(torch.float32).addmm_(h.index_select(0, rows), B[p].to(torch.float32).t(),
                                                              alpha=scales[p])
        y.index_copy_(0, rows, yp.to(y.dtype))
    return y


def bit_misses(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions where the 1-D integer tensors a and b differ, ascending, and a - b there, both int64."""
    loc = (b != a).nonzero().squeeze(1)
    return loc, a[loc].to(torch.int64) - b[loc].to(torch.int64)


def fp8_merge(q: torch.Tensor, scale_inv: torch.Tensor, Bs: torch.Tensor, A: torch.Tensor, block: tuple[int, int],
              stochastic: bool, key: int, scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block-FP8 merge (``portllm.ops.fp8_merge``), band by band of ``bm`` rows: W = float(q)·scale_inv
    (fp32); W' = float32(float64(W) + Σ_k float64(Bs[:, k])·float64(A[k]), k ascending); then
    ``fp8.quantize`` of W' with the stream ``key`` at the elements' flat indices. Returns (q', scale_inv',
    float64 [⟨Q−W, Δ⟩, ‖Δ‖², ‖Q−W−Δ‖²]). ``scale_fmt="ue8m0"``: power-of-two scales (``fp8.quantize``)."""
    from portllm import fp8

    bm, _ = block
    M, N = q.shape
    out_q, out_s = torch.empty_like(q), torch.empty_like(scale_inv)
    sums = torch.zeros(3, dtype=torch.float64, device=q.device)
    Ad = A.double()
    rounding = "stochastic" if stochastic else "nearest"
    for i0 in range(0, M, bm):
        i1 = min(M, i0 + bm)
        W = fp8.dequantize(q[i0:i1], scale_inv[i0 // bm:i0 // bm + 1], block)
        acc = W.double()
        for k in range(Bs.shape[1]):
            acc += Bs[i0:i1, k:k + 1].double() * Ad[k:k + 1]
        W1 = acc.float()
        qb, sb = fp8.quantize(W1, block, rounding, key=key, first_row=i0, scale_fmt=scale_fmt)
        out_q[i0:i1], out_s[i0 // bm] = qb, sb[0]
        Wd, delta = W.double(), W1.double() - W.double()
        moved = fp8.dequantize(qb, sb, block).double() - Wd
        sums += torch.stack([(moved * delta).sum(), (delta * delta).sum(), ((moved - delta) ** 2).sum()])
    return out_q, out_s, sums


def mxfp4_merge(blocks: torch.Tensor, scales: torch.Tensor, Bs: torch.Tensor, A: torch.Tensor, fresh: bool,
                stochastic: bool, key: int, first: int):
    """The MXFP4 merge of one expert (``portllm.ops.mxfp4_merge``; the math in ``portllm.mxfp4``), band by
    band of rows: W = dequantize(blocks, scales) (fp32, exact); W' = float32(float64(W) + Σ_k
    float64(Bs[:, k])·float64(A[k]), k ascending); the block scales (fresh, or kept where they fit, else
    fresh: ``clipped``); the codes for both roundings, the asked-for one written. Returns (blocks',
    scales', float64 [2, 3] sums [⟨Q−W, Δ⟩, ‖Δ‖², ‖Q−W−Δ‖²] for the rounding asked for then the other,
    clipped bool [R, G])."""
    from portllm import mxfp4

    R, G, _ = blocks.shape
    K = G * mxfp4.GROUP
    out_b, out_s = torch.empty_like(blocks), torch.empty_like(scales)
    sums = torch.zeros(2, 3, dtype=torch.float64, device=blocks.device)
    clipped = torch.zeros(R, G, dtype=torch.bool, device=blocks.device)
    Ad = A.double()
    rows = max(1, _CHUNK_ELEMS // K)
    for i0 in range(0, R, rows):
        i1 = min(R, i0 + rows)
        W = mxfp4.dequantize(blocks[i0:i1], scales[i0:i1])
        Wd = W.double()
        acc = Wd.clone()
        for k in range(Bs.shape[1]):
            acc += Bs[i0:i1, k:k + 1].double() * Ad[k:k + 1]
        W1 = acc.float()
        sc = mxfp4.fresh_scales(W1)
        if not fresh:
            amax = W1.reshape(i1 - i0, G, mxfp4.GROUP).abs().amax(-1).double()
            over = ~(amax * torch.pow(2.0, 127 - scales[i0:i1].double()) < mxfp4.CLIP)  # (NaN: over)
            clipped[i0:i1] = over
            sc = torch.where(over, sc, scales[i0:i1])
        out_s[i0:i1] = sc
        delta = W1.double() - Wd
        for j, st in enumerate((stochastic, not stochastic)):
            qb = mxfp4.quantize(W1, sc, st, key=key, first=first + i0 * K)
            if j == 0:
                out_b[i0:i1] = qb
            moved = mxfp4.dequantize(qb, sc).double() - Wd
            sums[j] += torch.stack([(moved * delta).sum(), (delta * delta).sum(), ((moved - delta) ** 2).sum()])
    return out_b, out_s, sums, clipped
