"""``PatchedLinear``: a frozen ``nn.Linear`` that serves up to ``max_patches`` patches at once.

    y[t] = x[t]·Wᵀ + bias + s_p·(x[t]·A_pᵀ)·B_pᵀ,    p = the patch slot of token t (or none)

computed as the base product, then ``lora_shrink`` (h = x·A_pᵀ per token, fp32) and
``lora_expand_`` (y += s_p·h·B_pᵀ in place, fp32 accumulation, one rounding per element), with
tokens grouped by slot. Tokens routed to no patch get the base output, bit for bit the plain
layer's. The slots are preallocated buffers (factors padded to ``max_rank`` with zeros, one scale
each), so loading or replacing a patch copies into them and allocates nothing: a model under
``torch.compile`` or in a CUDA graph keeps running. Inference only: the patches take no gradients.

The layer is an ``nn.Linear`` that shares the base layer's ``weight`` and ``bias`` (the same
Parameters, never copies), and its slot buffers are not persistent, so the model's
``state_dict`` keeps the base model's keys and values.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from portllm import ops


class Routing:
    """Which patch slot each row of the batch uses, per thread: shared by every PatchedLinear of one
    model (set by ``portllm.serve.route``), but each thread sees only the routing its own ``route``
    blocks set. ``rows`` is None outside a route block (base model). (A ``threading.local``:
    ``torch.compile`` reads it without a graph break; a ``ContextVar`` makes Dynamo skip the frame.)

    Every layer of a forward routes the same tokens, so the per-token slots and the kernels' token
    grouping, and the backend the serving kernels run on, are computed once per batch shape and kept
    until the routing changes (``cache``, per thread too): a decode step pays for them once, not
    once per layer. (Not under ``torch.compile``,
    which traces the computation into each layer's graph instead.)"""

    def __init__(self):
        self._local = threading.local()

    @property
    def rows(self) -> torch.Tensor | None:  # [batch] int64, -1 = no patch
        return getattr(self._local, "rows", None)

    @property
    def names(self) -> list | None:
        return getattr(self._local, "names", None)

    @property
    def expand(self) -> int | None:
        """Rows per name that this route block's forwards expand to (generate's beams), once seen."""
        return getattr(self._local, "expand", None)

    @expand.setter
    def expand(self, k: int):
        self._local.expand = k

    @property
    def cache(self) -> dict:
        c = getattr(self._local, "cache", None)
        if c is None:
            c = self._local.cache = {}
        return c

    def kernels(self, backend: str | None, slots: torch.Tensor, max_patches: int, device: torch.device):
        """The serving kernels' backend and token grouping for this batch (``ops.lora_tiles``):
        resolved once per routing and batch shape, then shared by every layer of every forward in
        the route block (each layer only looks them up)."""
        if torch.compiler.is_compiling():
            name = ops.resolve_backend(backend, device, "lora_shrink")
            return name, ops.lora_tiles(slots, max_patches, name)
        key = ("kernels", backend, max_patches, slots.shape[0], device)
        hit = self.cache.get(key)
        if hit is None:
            name = ops.resolve_backend(backend, device, "lora_shrink")
            hit = self.cache[key] = (name, ops.lora_tiles(slots, max_patches, name))
        return hit

    def set(self, rows, names, expand=None):
        self._local.rows, self._local.names, self._local.cache, self._local.expand = rows, names, {}, expand

    # A copy of a served model (copy.deepcopy, pickle) starts with no routing: route blocks belong
    # to the threads that entered them, on the original.
    def __deepcopy__(self, memo):
        new = Routing()
        memo[id(self)] = new
        return new

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._local = threading.local()


class PatchedLinear(torch.nn.Linear):
    def __init__(self, base: torch.nn.Linear, max_patches: int, max_rank: int, routing: Routing | None = None):
        torch.nn.Module.__init__(self)
        if not isinstance(base, torch.nn.Linear):
            raise TypeError(f"PatchedLinear wraps an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.__dict__["base_layer"] = base  # the original module, given back by detach (not a submodule)
        self.max_patches, self.max_rank = int(max_patches), int(max_rank)
        w = base.weight
        self.register_buffer("lora_A", torch.zeros(max_patches, max_rank, self.in_features, dtype=w.dtype,
                                                   device=w.device), persistent=False)
        # B is stored [P, R, out] (viewed as [P, out, R], ``lora_B``): the expand kernels read
        # consecutive output columns from consecutive addresses.
        self.register_buffer("lora_B_t", torch.zeros(max_patches, max_rank, self.out_features, dtype=w.dtype,
                                                     device=w.device), persistent=False)
        self.register_buffer("lora_scale", torch.zeros(max_patches, dtype=torch.float32, device=w.device),
                             persistent=False)
        self.routing = routing if routing is not None else Routing()
        self.backend: str | None = None

    def _apply(self, fn, recurse=True):
        # model.half() / .to(dtype) cast every floating buffer; the slot scales stay float32 (the
        # kernels take fp32 scales, and a scale rounded to fp16 would change the patch).
        scale = self.lora_scale
        out = super()._apply(fn, recurse)
        if self.lora_scale.dtype != torch.float32:
            self.lora_scale = scale.to(device=self.lora_scale.device)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"max_patches={self.max_patches}, max_rank={self.max_rank}")

    @property
    def lora_B(self) -> torch.Tensor:
        """[max_patches, out_features, max_rank]: each slot's B (a view of ``lora_B_t``)."""
        return self.lora_B_t.transpose(1, 2)

    # -- slots -----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_slot(self, slot: int, B: torch.Tensor | None, A: torch.Tensor | None, scale: float = 0.0):
        """Copies B [out, r], A [r, in] (r <= max_rank) into ``slot``, zero-padded; None clears it."""
        self.lora_A[slot].zero_()
        self.lora_B_t[slot].zero_()
        self.lora_scale[slot] = 0.0
        if B is None:
            return
        r = A.shape[0]
        self.lora_A[slot, :r].copy_(A)
        self.lora_B_t[slot, :r].copy_(B.t())
        self.lora_scale[slot] = float(scale)

    # -- forward ---------------------------------------------------------------------------------
    def token_slots(self, x: torch.Tensor) -> torch.Tensor | None:
        rows = self.routing.rows
        if rows is None:
            return None
        batch = x.shape[0] if x.dim() >= 2 else 1
        if torch.compiler.is_compiling():
            return self._token_slots(x, rows, batch)
        key = ("slots", batch, x.numel() // self.in_features, x.device)
        if key not in self.routing.cache:
            self.routing.cache[key] = self._token_slots(x, rows, batch)
        return self.routing.cache[key]

    def _token_slots(self, x, rows, batch):
        if not isinstance(rows, torch.Tensor):  # one patch for every row
            rows = rows.for_batch(batch)
        n = rows.shape[0]
        if n != batch:
            # generate(num_beams=k) and num_return_sequences=k repeat each request k times in a row
            # (repeat_interleave, as PEFT expands adapter_names for beams): row j is request j // k.
            # Only for [batch, tokens, features] inputs, and with one k per route block: a 2-D input
            # (an expert's gathered tokens) or a k that changes is not a generate expansion.
            k = batch // n if n and batch % n == 0 and x.dim() >= 3 else None
            fixed = self.routing.expand
            if k is None or (fixed is not None and fixed != k):
                raise ValueError(f"portllm.serve.route: the batch has {batch} rows but names has {n} entries "
                                 "(one per row, or one per request when generate expands each request to k rows "
                                 "of a [batch, tokens, features] input, the same k for the whole block)")
            if not torch.compiler.is_compiling():
                self.routing.expand = k
            rows = rows.repeat_interleave(k)
        per_row = x.numel() // (batch * self.in_features) if batch else 0
        rows = rows.to(x.device)
        return rows if per_row == 1 else rows.repeat_interleave(per_row)  # (decode: one token per row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        slots = self.token_slots(x)
        if slots is None:
            return y
        if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad):
            raise RuntimeError("portllm.serve: PatchedLinear serves patches for inference; run the model under "
                               "torch.no_grad() or torch.inference_mode() inside route()")
        x2 = x.reshape(-1, self.in_features)
        y2 = y.view(-1, self.out_features)
        backend, tiles = self.routing.kernels(self.backend, slots, self.max_patches, x.device)
        h = ops.lora_shrink(x2, self.lora_A, slots, backend=backend, tiles=tiles)
        ops.lora_expand_(y2, h, self.lora_B, self.lora_scale, slots, backend=backend, tiles=tiles)
        return y
