"""portllm's serving kernels as vLLM's LoRA backend: a punica wrapper whose LoRA products are
``portllm.ops.lora_shrink`` and ``portllm.ops.lora_expand_`` (the C++ kernels on a CPU).

vLLM's LoRA layers call their platform's punica wrapper (``vllm/lora/punica_wrapper``) with stacked
factors, one slot per resident adapter: for a linear layer of several output slices (qkv, gate_up),
per slice A [L, 1, r, in] and B [L, 1, out, r], r = ``max_lora_rank`` (an adapter of smaller rank
zero-padded), the adapter's scale already folded into B at load (``LoRALayerWeights.optimize``), and
per token the slot index (``token_lora_indices``; -1: no adapter). Those are exactly the ops'
operands: A[:, 0] is [P, R, n], B[:, 0] is [P, m, R], the slots are the slots. Each slice is one
shrink (fp32 h, exact products, fp32 sums) and one expand (fp32 sums, one rounding of y + h·Bᵀ):
vLLM's own CPU path rounds B·h in the model dtype before adding it to y.

A token with index -1 is left untouched, bit for bit (but for ``add_expand(..., add_inputs=False)``,
which zeroes the slice first; no CPU caller of vLLM 0.32 passes it). (vLLM 0.32's CPU ops index the stacked
weights with it, so in a batch with an adapter in the last slot a request without an adapter gets
that adapter; vLLM pull request #48421.)

Built by ``portllm.vllm_plugin`` only when the user opts in; importing this module needs vLLM.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from portllm import _ext, ops


# The C++ kernels where no adapter has more than max_tokens_per_adapter() of a step's tokens (decode,
# and short steps spread over adapters); from there on, the ops' measured default (portllm.defaults;
# the reference's ATen GEMMs on these CPUs). Measured (benchmarks/vllm_ops_crossover.py, 2026-12-05)
# on this project's 2-core EPYC, one thread, 1024 -> 16 -> 2816 bf16, shrink + expand, C++ against the
# reference (us), with the AVX-512 decode kernels (csrc/cpu/lora_decode.h): 1 token 22 vs 74; 8 tokens
# on one adapter 54 vs 129, on 8 adapters 66 vs 592; 16 on one 65 vs 116, on 8 74 vs 573; 32 on one
# 129 vs 141; 128 on 8 (16 each) 477 vs 992; 128 on one 393 vs 338. On the AVX2 path (forced): 8 on one
# 71 vs 91, 12 on one 101 vs 101, 16 on one 125 vs 117; so 16 where AVX-512 runs, else 8.
MAX_TOKENS_PER_ADAPTER = {"avx512bf16": 16, "avx512": 16}
MAX_TOKENS_PER_ADAPTER_ELSE = 8


def max_tokens_per_adapter() -> int:
    """The most tokens of one adapter in a step that still takes the C++ kernels, on the CPU path that
    runs now (PORTLLM_CPU_ISA forces a lower one)."""
    return MAX_TOKENS_PER_ADAPTER.get(_ext.cpu_isa(), MAX_TOKENS_PER_ADAPTER_ELSE)


def _direct(slots: torch.Tensor) -> bool:
    """Whether a step routed by ``slots`` takes the C++ kernels (``max_tokens_per_adapter``)."""
    if not (_ext.has_kernel("lora_shrink", "CPU") and _ext.has_kernel("lora_expand_", "CPU")):
        return False
    routed = slots[slots >= 0]
    return routed.numel() == 0 or int(torch.bincount(routed).max()) <= max_tokens_per_adapter()


def _kernels(direct: bool):
    """The C++ kernels called straight through the dispatcher (the wrapper's operands are vLLM's, of
    known shapes: the ops' Python checks would cost more than a decode step's products), or the
    checked ops on their default backend."""
    if direct:
        return torch.ops.portllm.lora_shrink, torch.ops.portllm.lora_expand_
    return ops.lora_shrink, ops.lora_expand_


class _PortllmOps:
    """The LoRA products of a punica wrapper on portllm's ops; the metadata (slots per token and per
    request) is the vLLM base class's.

    B is kept a second time, laid out [P, R, m] (output columns contiguous): vLLM stacks it [P, m, R],
    along which lora_expand_'s CPU kernel would read with a stride of R (it does not vectorise: 8
    tokens, 2816 columns, r=16 took 128 us against 50). The copies are made at first use, keyed by
    the stacked tensor's version counter (vLLM writes an adapter into its slot in place, which bumps
    it: a reload under the same id, ``load_inplace``, included), and all dropped whenever vLLM moves
    adapters between slots (``update_metadata`` sees its slot layout change)."""

    _ones: torch.Tensor | None = None
    _layouts: dict | None = None
    _slot_ids: list | None = None
    _direct_tokens = _direct_requests = False  # which kernels this step's layers and logits take

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        ids = list(lora_index_to_id)
        if ids != self._slot_ids:
            self._layouts, self._slot_ids = {}, ids
        out = super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._direct_tokens, self._direct_requests = _direct(self.token_lora_indices), _direct(self.sampler_indices)
        return out

    def _unit_scale(self, slots: int, device) -> torch.Tensor:
        if self._ones is None or self._ones.shape[0] != slots or self._ones.device != torch.device(device):
            self._ones = torch.ones(slots, dtype=torch.float32, device=device)
        return self._ones

    def _columns_contiguous(self, B: torch.Tensor, m: int) -> torch.Tensor:
        """B[:, 0, :m] ([P, m, R]) as a view of a [P, R, m] copy, made once per slot layout."""
        if self._layouts is None:
            self._layouts = {}
        key = (B.data_ptr(), tuple(B.shape), m, B._version)  # an adapter reloaded in place bumps the version
        out = self._layouts.get(key)
        if out is None:
            out = (B[:, 0] if B.dim() == 4 else B)[:, :m].transpose(1, 2).contiguous().transpose(1, 2)
            self._layouts[key] = out
        return out

    def _shrink(self, x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, scale: float,
                direct: bool) -> torch.Tensor:
        shrink, _ = _kernels(direct)
        h = shrink(x, A[:, 0] if A.dim() == 4 else A, slots)
        return h if scale == 1.0 else h.mul_(scale)

    def _expand(self, y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                add_inputs: bool, direct: bool) -> None:
        _, expand_ = _kernels(direct)
        # the logits: B may be padded past the vocabulary, or the logits padded past B's (vocabulary
        # 250, logits 256): the columns both have
        m = min(y.shape[1], B.shape[-2])
        y = y[:, :m]
        B = self._columns_contiguous(B, m)
        if not add_inputs:
            y.zero_()
        h = h if h.dtype == torch.float32 else h.float()
        expand_(y, h.contiguous(), B, self._unit_scale(B.shape[0], y.device), slots)

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs: Any) -> None:
        x = x.view(-1, x.shape[-1])
        for i, A in enumerate(lora_a_stacked):
            h = self._shrink(x, A, self.token_lora_indices, scale, self._direct_tokens)
            y[i][:, :h.shape[1]].copy_(h)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0,
                   add_inputs: bool = True, **kwargs: Any) -> None:
        y2 = y.view(-1, y.shape[-1])
        off = offset_start
        for i, B in enumerate(lora_b_stacked):
            n = output_slices[i]
            self._expand(y2[:, off:off + n], x[i], B, self.token_lora_indices, add_inputs, self._direct_tokens)
            off += n

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> None:
        self._expand(y.view(-1, y.shape[-1]), x, lora_b_stacked, self.token_lora_indices, add_inputs,
                     self._direct_tokens)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs: Any) -> None:
        if not (len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)):
            raise ValueError(f"portllm punica wrapper: {len(lora_a_stacked)} A slices, {len(lora_b_stacked)} B "
                             f"slices, {len(output_slices)} output slices")
        x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        slots, off = self.token_lora_indices, 0
        for A, B, n in zip(lora_a_stacked, lora_b_stacked, output_slices):
            self._expand(y2[:, off:off + n], self._shrink(x2, A, slots, scale, self._direct_tokens), B, slots, True,
                         self._direct_tokens)
            off += n

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs: Any) -> None:
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        slots = self.sampler_indices
        d = self._direct_requests
        self._expand(y2, self._shrink(x2, lora_a_stacked, slots, scale, d), lora_b_stacked, slots, True, d)


class PortllmPunicaWrapperCPU(_PortllmOps, PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with its LoRA products on portllm's ops (metadata, and the
    classifier heads' ``apply_lora_full_linear``, are vLLM's)."""
