"""PMSSLinear: a frozen linear layer plus a trained r×r core U between a skeleton of its own weight.

    y = x·Wᵀ + s·((x·Wᵀ)[:, I]·Uᵀ)·W[:, J]ᵀ + bias            (ΔW = s·C·U·R, C = W[:, J], R = W[I, :])

The base GEMM runs once; h = (x·Wᵀ)[:, I] is gathered from it (x·R ᵀ equals it because W is
unmodified). Backward, with g = dy·W[:, J]:

    dU = s·gᵀ·h            dx = dy·W + s·(g·U)·W[I, :]

Only h (tokens × r) is saved for backward. C and R are never stored: with the default form,
``"gemm"``, they are gathered for the duration of one GEMM each, whose output is the base GEMM's
(addmm_, beta = 1); with a named ``skeleton_mm`` backend (``reference``, ``cpp``, ``cuda``,
``triton``) ``portllm.ops.skeleton_mm`` reads them out of W by index.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from portllm import ops
from portllm.pmss import sharded


# The layer's ways to run the skeleton products: "gemm", the default, or a backend of skeleton_mm.
# On the H100 "gemm" took 1.49 ms against triton 3.28 ms and cuda 5.46 ms (bf16; labelled
# "pmss-reference" in that result, from before 2026-12-04). On the 2-core AMD EPYC the forms are level
# within its noise: on 2026-11-22 gemm 215.6 ms against cpp 211.5 ms; on 2026-12-04 medians gemm 401.7,
# reference 402.0, cpp 401.3 ms, while the ratios to PEFT's LoRA layer timed alternately in the same
# tests put gemm last (0.88 against 0.85 and 0.83); a later run that day (the committed results) put it
# first: gemm 398.3, reference 416.4, cpp 443.1 ms (0.78, 0.80, 0.82 of LoRA). So on the CPU the forms
# are within the machine's run-to-run spread, gemm not measured to be reliably the fastest. The skeleton_mm kernels stay named, tested options (tests/test_pmss_ops.py).
GEMM = "gemm"


def resolve_backend(backend: str | None, x2: torch.Tensor, W: torch.Tensor) -> str:
    """``"gemm"`` unless a skeleton_mm backend is named (argument, else ``PORTLLM_BACKEND``); a named
    one is checked like every op's (``ops.resolve_skeleton_backend``)."""
    if backend is None:
        backend = os.environ.get("PORTLLM_BACKEND") or None
    if backend in (None, "auto", GEMM):
        return GEMM
    return ops.resolve_skeleton_backend(backend, x2, W)


class _PMSSFunction(torch.autograd.Function):
    """Two ways to run the skeleton products, by ``resolve_backend``:

    * ``gemm`` (the default): gather C = W[:, J] (m×r) and R = W[I, :] (r×n), a few MB, and hand
      the products to the BLAS GEMM accumulating into the base GEMM's output and into dx in place
      (``addmm_``, beta = 1): no tokens×m temporary and no separate add. z = s·h·Uᵀ is formed in
      fp32 (r×r work) and rounded once to the activations' dtype. The gathered copies are freed at
      once, never stored.
    * a skeleton_mm backend (``reference``/``cpp``/``cuda``/``triton``): ``portllm.ops.skeleton_mm``
      reads C and R out of W by index.
    """

    @staticmethod
    def forward(ctx, x, W, bias, I, J, U, scale, backend):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        backend = resolve_backend(backend, x2, W)
        fused = backend == GEMM
        y = x2 @ W.t()  # the base GEMM, once
        h = y.index_select(1, I)  # [T, r] == x·W[I, :]ᵀ
        acc = torch.promote_types(h.dtype, torch.float32)
        if fused:
            z = (h.to(acc) @ (scale * U.to(acc)).t()).to(y.dtype)
            y.addmm_(z, W.index_select(1, J).t().to(y.dtype))
        else:
            z = h @ U.to(h.dtype).t()
            y = y + scale * ops.skeleton_mm(z, W, J, "ct", backend=backend)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(h, W, I, J, U)
        ctx.scale, ctx.backend, ctx.x_shape, ctx.fused = scale, backend, shape, fused
        return y.reshape(*shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, dy):
        h, W, I, J, U = ctx.saved_tensors
        s, backend = ctx.scale, ctx.backend
        dy2 = dy.reshape(-1, W.shape[0])
        acc = torch.promote_types(dy2.dtype, torch.float32)  # r×r work in fp32 (fp64 stays fp64)
        if ctx.fused:
            g = dy2 @ W.index_select(1, J).to(dy2.dtype)  # [T, r] = dy·W[:, J]
        else:
            g = ops.skeleton_mm(dy2, W, J, "c", backend=backend)
        dU = (s * (g.to(acc).t() @ h.to(acc))).to(U.dtype) if ctx.needs_input_grad[5] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ W.to(dy2.dtype)
            gu = (g.to(acc) @ (s * U.to(acc))).to(dy2.dtype)
            if ctx.fused:
                dx.addmm_(gu, W.index_select(0, I).to(dy2.dtype))
            else:
                dx = dx + ops.skeleton_mm(gu, W, I, "r", backend=backend)
            dx = dx.reshape(ctx.x_shape)
        dbias = dy2.sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, dbias, None, None, dU, None, None


def pmss_linear(x, W, bias, I, J, U, scale: float = 1.0, backend: str | None = None):
    """Functional PMSS linear layer (see the module docstring)."""
    return _PMSSFunction.apply(x, W, bias, I, J, U, float(scale), backend)


def check_indices(I: torch.Tensor, J: torch.Tensor, m: int, n: int):
    """TypeError / ValueError unless I (rows of an m×n weight) and J (its columns) are 1-D integer
    tensors of equal length, in range, without repeats."""
    for name, idx, size in (("I", I, m), ("J", J, n)):
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"PMSSLinear: {name} must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise ValueError(f"PMSSLinear: {name} has indices outside 0..{size - 1}")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"PMSSLinear: {name} has repeated indices")
    if I.numel() != J.numel():
        raise ValueError(f"PMSSLinear: I has {I.numel()} indices, J {J.numel()}: both must have r")


class PMSSLinear(nn.Module):
    """Wraps an ``nn.Linear`` whose weight (and bias) stay frozen; U [r, r] is the only Parameter,
    I and J are int64 buffers. U starts at zero: the layer starts as the base layer.

    Its state dict is the base layer's under the base layer's own keys (``weight``, ``bias``: the
    same Parameters, never copies) plus ``I``, ``J``, ``U`` and ``s`` (the scale). So what the HF
    Trainer saves (``save_model``, checkpoints) loads back into a plain model with
    ``from_pretrained`` as the base weights, never as missing ones, with the fine-tune recovered
    by ``portllm.pmss.load(model, directory)``; and ``resume_from_checkpoint`` into an injected
    model restores U exactly."""

    def __init__(self, base: nn.Linear, I: torch.Tensor, J: torch.Tensor, scale: float = 1.0,
                 backend: str | None = None, U: torch.Tensor | None = None):
        super().__init__()
        m, n = base.weight.shape
        I, J = torch.as_tensor(I), torch.as_tensor(J)
        check_indices(I, J, m, n)
        r = I.numel()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.weight = base.weight
        self.bias = base.bias
        # The original module (not a submodule: its keys would double the state dict), given back by
        # restored_base(), which re-attaches this layer's current Parameters: a wrapper may have
        # replaced them meanwhile (load_state_dict(assign=True), FSDP2's sharded copies, offload).
        self.__dict__["base"] = base
        self.register_buffer("I", I.to(device=self.weight.device, dtype=torch.int64))
        self.register_buffer("J", J.to(device=self.weight.device, dtype=torch.int64))
        # U is at least fp32 and at least as wide as W (fp64 for a float64 model: gradcheck-exact).
        udtype = torch.promote_types(self.weight.dtype, torch.float32)
        u = (torch.zeros(r, r, dtype=udtype, device=self.weight.device) if U is None
             else U.detach().to(udtype))
        if u.shape != (r, r):
            raise ValueError(f"PMSSLinear: U must be [{r}, {r}], got {tuple(u.shape)}")
        self.U = nn.Parameter(u.to(self.weight.device))
        self.register_buffer("s", torch.tensor(float(scale), dtype=torch.float64, device=self.weight.device))
        self.scale = float(scale)
        self.backend = backend

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = float(self.s)  # the loaded scale is the one forward uses

    def restored_base(self) -> nn.Linear:
        """The original ``nn.Linear``, holding this layer's current weight and bias again."""
        self.base.weight = self.weight
        self.base.bias = self.bias
        return self.base

    def _apply(self, fn, recurse=True):
        u = self.U.data
        out = super()._apply(fn, recurse)
        if self.s.dtype != torch.float64:  # model.half() must not round the scale
            self.s = torch.tensor(self.scale, dtype=torch.float64, device=self.s.device)
        udtype = torch.promote_types(self.weight.dtype, torch.float32)
        if self.U.dtype != udtype:  # nor U: at least fp32, at least as wide as W (from the unrounded U)
            self.U.data = u.to(device=self.U.device, dtype=udtype)
        return out

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        return self.I.numel()

    def forward(self, x):
        if sharded.is_sharded(self.weight):
            raise RuntimeError("PMSSLinear: its weight is a shard (an FSDP2 DTensor) at forward time: call the model "
                               "through the fully_shard module that holds this layer (shard each decoder layer and the "
                               "root after pmss.inject), which gathers the whole weight for forward")
        return pmss_linear(x, self.weight, self.bias, self.I, self.J, self.U, self.scale, self.backend)

    def delta(self) -> torch.Tensor:
        """ΔW = s·W[:, J]·U·W[I, :] in fp32 (dense: for checks, not for training)."""
        W = self.weight.detach().float()
        return self.scale * W[:, self.J] @ self.U.detach().float() @ W[self.I, :]

    def extra_repr(self) -> str:
        m, n = self.weight.shape
        return f"in_features={n}, out_features={m}, rank={self.rank}, scale={self.scale}"
