"""Skeleton selection: which r rows I and r columns J of W carry its dominant subspace.

``select_skeleton(W, r, method)``:

* ``"deim"``: the discrete empirical interpolation method (greedy, Chaturantabut & Sorensen 2010) on
  W's top-r left singular vectors gives I, on its right singular vectors gives J;
* ``"qdeim"``: column-pivoted QR of the singular vectors' transposes (Drmač & Gugercin 2016);
* ``"norm"``: the r rows and r columns of largest Euclidean norm (a cheap baseline).

Singular vectors come from a randomized SVD (``torch.svd_lowrank``, seeded: the same W and seed give
the same indices). Runs where W is (GPU or CPU), and on a batch [b, m, n] of equal-shape matrices
at once. I and J are returned sorted (ascending), each distinct and in range: sorting keeps the
skeleton GEMMs' gathers local, and U is defined against the sorted order.
"""

from __future__ import annotations

import torch

METHODS = ("deim", "qdeim", "norm")


def _check(W: torch.Tensor, r: int):
    if W.dim() not in (2, 3):
        raise ValueError(f"select_skeleton: W must be [m, n] or a batch [b, m, n], got shape {tuple(W.shape)}")
    m, n = W.shape[-2:]
    if not isinstance(r, int) or r < 1 or r > min(m, n):
        raise ValueError(f"select_skeleton: rank r={r} must be in 1..min(m, n)={min(m, n)} for W of shape "
                         f"{tuple(W.shape)}")


def _top_singular_vectors(W: torch.Tensor, r: int, seed: int, niter: int):
    """U [b, m, r], V [b, n, r] of the top r singular triplets (randomized, seeded)."""
    m, n = W.shape[-2:]
    q = min(r + 10, m, n)
    devices = [W.device] if W.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(W.float(), q=q, niter=niter)
    return U[..., :r], V[..., :r]


def deim(U: torch.Tensor) -> torch.Tensor:
    """DEIM indices [b, r] of the columns of U [b, m, r] (greedy interpolation points), from an LU
    factorisation with partial pivoting.

    DEIM's step j takes the row where column j of U, after j steps of Gaussian elimination with the
    rows chosen so far as pivots, is largest (``deim_incremental``): that is exactly the pivot that
    partial pivoting takes at step j. So the first r row pivots of U = P·L·R (LAPACK's blocked getrf,
    BLAS-3; cuSOLVER's batched one on a GPU, through ``torch.linalg.lu_factor``) are DEIM's indices, in
    order, ties aside (the blocked elimination rounds in another order, and a tie between remaining
    rows is broken in the permuted order). fp64. Tested against ``deim_lstsq``, the definition.
    """
    b, m, r = U.shape
    _, piv = torch.linalg.lu_factor(U.double())  # LAPACK's sequential row swaps, 1-based: row j <-> piv[j]
    piv = piv.long() - 1
    perm = torch.arange(m, device=U.device).repeat(b, 1)
    rows = torch.arange(b, device=U.device)
    for j in range(r):  # the swaps applied in turn; perm[:, :r] ends as the pivot rows, in order
        i = piv[:, j]
        a = perm[rows, j].clone()
        perm[rows, j] = perm[rows, i]
        perm[rows, i] = a
    return perm[:, :r].contiguous()


def deim_incremental(U: torch.Tensor) -> torch.Tensor:
    """DEIM indices [b, r] of the columns of U [b, m, r] (greedy interpolation points), incrementally
    (what ``deim`` used before its LU form; kept as a second oracle and for the benchmark).

    Step j picks the row where the residual u_j − U[:, :j]·(U[P, :j])⁻¹·u_j[P] is largest. That
    residual is column j of U after j steps of Gaussian elimination with the chosen rows as pivots
    (a Schur complement), so each step is one rank-1 update of the remaining columns: O(m·r²) in
    all, one fused update per step and no growing least-squares solves. The same indices as the
    direct form (``deim_lstsq``, kept as the test oracle), ties aside; fp64.
    """
    b, m, r = U.shape
    idx = torch.empty(b, r, dtype=torch.long, device=U.device)
    taken = torch.zeros(b, m, dtype=torch.bool, device=U.device)
    rows = torch.arange(b, device=U.device)
    R = U.double().clone()
    for j in range(r):
        col = R[:, :, j]
        p = col.abs().masked_fill(taken, -1.0).argmax(dim=1)
        idx[:, j] = p
        taken[rows, p] = True
        if j + 1 < r:
            # eliminate row p from the later columns: R[:, k] -= R[:, j] · R[p, k] / R[p, j]
            pivot_row = R[rows, p, j + 1:] / R[rows, p, j][:, None]  # [b, r - j - 1]
            R[:, :, j + 1:].sub_(col[:, :, None] * pivot_row[:, None, :])
    return idx


def deim_lstsq(U: torch.Tensor) -> torch.Tensor:
    """DEIM indices [b, r] by the definition: at step j, solve U[P, :j]·c = u_j[P] and take the
    largest residual |u_j − U[:, :j]·c|. O(r) growing solves: slow on a GPU; the oracle for ``deim``."""
    b, m, r = U.shape
    idx = torch.empty(b, r, dtype=torch.long, device=U.device)
    taken = torch.zeros(b, m, dtype=torch.bool, device=U.device)
    rows = torch.arange(b, device=U.device)
    U = U.double()
    res = U[..., 0]
    for j in range(r):
        if j > 0:
            P = idx[:, :j]
            Ub = U[..., :j]
            # c solves U[p, :j] c = u_j[p]; the residual u_j − U[:, :j] c vanishes on the chosen rows
            A = torch.gather(Ub, 1, P[..., None].expand(b, j, j))
            rhs = torch.gather(U[..., j], 1, P)
            c = torch.linalg.lstsq(A, rhs[..., None]).solution
            res = U[..., j] - (Ub @ c)[..., 0]
        score = res.abs().masked_fill(taken, -1.0)
        p = score.argmax(dim=1)
        idx[:, j] = p
        taken[rows, p] = True
    return idx


def qdeim(U: torch.Tensor) -> torch.Tensor:
    """Q-DEIM indices [b, r]: the first r pivots of a column-pivoted QR of Uᵀ [b, r, m]
    (modified Gram-Schmidt with pivoting on the largest remaining column norm)."""
    b, m, r = U.shape
    X = U.double().transpose(1, 2).clone()  # [b, r, m]: columns are U's rows
    idx = torch.empty(b, r, dtype=torch.long, device=U.device)
    taken = torch.zeros(b, m, dtype=torch.bool, device=U.device)
    rows = torch.arange(b, device=U.device)
    for j in range(r):
        norms = (X * X).sum(1).masked_fill(taken, -1.0)
        p = norms.argmax(dim=1)
        idx[:, j] = p
        taken[rows, p] = True
        q = X[rows, :, p]
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        X = X - q[:, :, None] * (q[:, None, :] @ X)
    return idx


def select_skeleton(W: torch.Tensor, r: int, method: str = "deim", *, seed: int = 0,
                    niter: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices I and column indices J (int64, sorted, each distinct), shape [r] or [b, r]."""
    _check(W, r)
    if method not in METHODS:
        raise ValueError(f"select_skeleton: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    batched = W.dim() == 3
    Wb = W.detach() if batched else W.detach()[None]
    if method == "norm":
        Wf = Wb.float()
        I = Wf.norm(dim=2).topk(r, dim=1).indices
        J = Wf.norm(dim=1).topk(r, dim=1).indices
    else:
        U, V = _top_singular_vectors(Wb, r, seed, niter)
        pick = deim if method == "deim" else qdeim
        I, J = pick(U), pick(V)
    I, J = I.sort(dim=1).values, J.sort(dim=1).values
    return (I, J) if batched else (I[0], J[0])
