"""The FP8 checkpoint formats a port reads and writes, told apart by config.json's ``quantization_config``:

* ``BlockFP8``: transformers' ``quant_method: "fp8"`` with ``weight_block_size`` (DeepSeek-V3, the
  Qwen3 FP8 releases): ``weight_scale_inv`` float32 per block (``portllm.fp8``, ``ops.fp8_merge``).
* ``CompressedFP8``: ``quant_method: "compressed-tensors"``, format ``float-quantized`` (llm-compressor's
  FP8, FP8_DYNAMIC, FP8_BLOCK): ``weight_scale`` in the model's dtype per tensor, channel or block
  (``portllm.fp8_compressed``); format ``mxfp8-quantized``: ``weight_scale`` uint8 e8m0 per 32 inputs
  (``portllm.mxfp8``).

Each one checks a weight's scales, dequantizes, merges and requantizes as its own loader and
quantizer do. ``quant_method: "mxfp4"`` (GPT-OSS's experts) is ported by ``portllm.port_mxfp4``, and
compressed-tensors' ``nvfp4-pack-quantized`` by ``portllm.port_nvfp4``. Any
other quantization is refused in one line naming it.
"""

from __future__ import annotations

import json
import os

import torch

from portllm import fp8, fp8_compressed, mxfp8


class BlockFP8:
    suffix = "_scale_inv"

    def __init__(self, block: tuple[int, int], scale_fmt: str = "float"):
        self.block, self.scale_fmt = block, scale_fmt

    def describe(self) -> str:
        return f"block-FP8, blocks {self.block[0]}x{self.block[1]}"

    def check(self, key: str, shape, dtype, scale: torch.Tensor):
        if dtype != fp8.E4M3:
            raise fp8.FP8FormatError(f"tensor {key}: expected a 2-D float8_e4m3fn weight, got {dtype} {tuple(shape)}")
        fp8.check_block_scales(torch.empty(shape, dtype=fp8.E4M3, device="meta"), scale, self.block, key)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return fp8.dequantize(q, scale, self.block)

    def backend(self, backend, device):
        from portllm import ops

        return ops.resolve_backend(backend, device, "fp8_merge")

    def merge(self, q, scale, B, A, s, *, rounding, seed, backend, name, device):
        """On ``device`` (the port's), the results back on the CPU."""
        q2, s2, st = fp8.merge_(q.to(device), scale.to(device), B.to(device), A.to(device), s.to(device),
                                self.block, rounding=rounding, seed=seed, backend=backend, scale_fmt=self.scale_fmt)
        return q2.cpu(), s2.cpu(), st

    def also_dropped(self, keys, weights) -> set[str]:
        return set()


class CompressedFP8:
    suffix = "_scale"
    _COMPANIONS = ("weight_zero_point", "input_scale", "input_zero_point", "output_scale", "output_zero_point")

    def __init__(self, strategy: str, block: tuple[int, int] | None, kv_cache: bool):
        self.strategy, self.block, self.kv_cache = strategy, block, kv_cache

    def describe(self) -> str:
        per = f"blocks {self.block[0]}x{self.block[1]}" if self.strategy == "block" else f"per {self.strategy}"
        return f"compressed-tensors FP8, scales {per}"

    def _block(self, shape):
        return fp8_compressed.block_of(self.strategy, tuple(shape), self.block)

    def check(self, key: str, shape, dtype, scale: torch.Tensor):
        fp8_compressed.check_scales(tuple(shape), dtype, scale, self.strategy, self.block, key)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return fp8_compressed.dequantize(q, scale, self._block(q.shape)).float()

    def backend(self, backend, device):
        if backend not in (None, "reference"):
            raise ValueError(f"backend {backend!r}: the compressed-tensors FP8 merge runs on the reference backend "
                             "only (PyTorch ops, bit for bit compressed-tensors' quantizer); leave --backend out")
        return "reference"

    def merge(self, q, scale, B, A, s, *, rounding, seed, backend, name, device):
        """On the CPU (PyTorch ops), whatever the port's device."""
        return fp8_compressed.merge_(q, scale, B, A, s, self._block(q.shape), rounding=rounding, seed=seed,
                                     name=name)

    def also_dropped(self, keys, weights) -> set[str]:
        """Written dequantized, the model has no quantized modules left: their activation scales and
        zero points go with the weight scales (and the KV-cache scales with the kv_cache_scheme)."""
        prefixes = {w.removesuffix("weight") for w in weights}
        out = {k for k in keys if any(k == p + c for p in prefixes for c in self._COMPANIONS)}
        if self.kv_cache:
            out |= {k for k in keys if k.endswith((".k_scale", ".v_scale"))}
        return out


class CompressedMXFP8(CompressedFP8):
    """compressed-tensors' ``mxfp8-quantized``: ``weight`` e4m3 and ``weight_scale`` uint8 e8m0 per 32
    (``portllm.mxfp8``)."""

    def __init__(self, kv_cache: bool):
        super().__init__("group", None, kv_cache)

    def describe(self) -> str:
        return "compressed-tensors MXFP8, an e8m0 scale per 32"

    def check(self, key: str, shape, dtype, scale: torch.Tensor):
        mxfp8.check(key, shape, dtype, scale)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return mxfp8.dequantize(q, scale)

    def merge(self, q, scale, B, A, s, *, rounding, seed, backend, name, device):
        """On the CPU (PyTorch ops), whatever the port's device."""
        return mxfp8.merge_(q, scale, B, A, s, rounding=rounding, seed=seed, name=name)


def _compressed(qc: dict, path: str):
    where = f"{path}: quantization_config"
    status = qc.get("quantization_status")
    if status != "compressed":
        raise fp8.FP8FormatError(f"{where}.quantization_status is {status!r}; portllm merges into compressed "
                                 "checkpoints (\"compressed\") only")
    if qc.get("format") == NVFP4_FORMAT:
        return _nvfp4(qc, where)
    if qc.get("format") == MXFP8_FORMAT:
        _one_scheme(qc, where, MXFP8_FORMAT, _MXFP8_WEIGHTS, ("torch.uint8",),
                    "MXFP8 (8-bit float, symmetric, static, groups of 32, e8m0 scales: scale_dtype torch.uint8)")
        return CompressedMXFP8(bool(qc.get("kv_cache_scheme")))
    formats = ("float-quantized", "naive-quantized")
    if qc.get("format") not in formats:
        raise fp8.FP8FormatError(f"{where}.format is {qc.get('format')!r}; portllm merges into compressed-tensors "
                                 "FP8 (float-quantized) only; port onto the 16-bit release of the model instead")
    for field in ("sparsity_config", "transform_config"):
        if qc.get(field):
            raise fp8.FP8FormatError(f"{where}.{field} is set; portllm cannot merge into sparse or transformed "
                                     "(rotated) weights; port onto the 16-bit release of the model instead")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise fp8.FP8FormatError(f"{where}.config_groups is {groups!r}; expected the quantization schemes")
    schemes = set()
    for gname, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if w is None:
            continue
        field = f"{where}.config_groups.{gname}.weights"
        if g.get("format", qc.get("format")) not in formats:
            raise fp8.FP8FormatError(f"{where}.config_groups.{gname}.format is {g.get('format')!r}; portllm merges "
                                     "into compressed-tensors FP8 (float-quantized) only")
        if not isinstance(w, dict) or w.get("num_bits") != 8 or w.get("type") != "float":
            raise fp8.FP8FormatError(f"{field}: {w!r} is not 8-bit float; portllm merges into FP8 (e4m3) only")
        if w.get("symmetric") is not True or w.get("dynamic") not in (False, None):
            raise fp8.FP8FormatError(f"{field}: portllm merges into symmetric, static FP8 weight scales only")
        if w.get("scale_dtype") is not None or w.get("group_size") is not None:
            raise fp8.FP8FormatError(f"{field}: scale_dtype / group_size are set; portllm merges into tensor, "
                                     "channel or block FP8 scales in the model's dtype only")
        strategy = w.get("strategy")
        if strategy not in fp8_compressed.STRATEGIES:
            raise fp8.FP8FormatError(f"{field}.strategy is {strategy!r}; portllm merges into tensor, channel or "
                                     "block FP8 scales")
        block = None
        if strategy == "block":
            b = w.get("block_structure")
            if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
                raise fp8.FP8FormatError(f"{field}.block_structure is {b!r}; expected [rows, cols]")
            block = (b[0], b[1])
        schemes.add((strategy, block))
    if len(schemes) != 1:
        raise fp8.FP8FormatError(f"{where}.config_groups: {len(schemes)} weight schemes ({sorted(map(str, schemes))}); "
                                 "portllm merges into checkpoints with one FP8 weight scheme")
    strategy, block = schemes.pop()
    return CompressedFP8(strategy, block, bool(qc.get("kv_cache_scheme")))


NVFP4_FORMAT = "nvfp4-pack-quantized"
_NVFP4_WEIGHTS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group"}


MXFP8_FORMAT = "mxfp8-quantized"
_MXFP8_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group"}


def _one_scheme(qc: dict, where: str, fmt: str, want: dict, scale_dtypes: tuple, what: str):
    """FP8FormatError naming the field unless every weight scheme of ``qc`` is ``want`` in format ``fmt``."""
    for field in ("sparsity_config", "transform_config"):
        if qc.get(field):
            raise fp8.FP8FormatError(f"{where}.{field} is set; portllm cannot merge into sparse or transformed "
                                     "(rotated) weights; port onto the 16-bit release of the model instead")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise fp8.FP8FormatError(f"{where}.config_groups is {groups!r}; expected the quantization schemes")
    for gname, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if w is None:
            continue
        field = f"{where}.config_groups.{gname}"
        if g.get("format") not in (None, fmt):
            raise fp8.FP8FormatError(f"{field}.format is {g.get('format')!r}; portllm merges into checkpoints with "
                                     f"one format ({fmt} here)")
        wrong = {k: w.get(k) for k, v in want.items() if not isinstance(w, dict) or w.get(k) != v}
        if wrong or w.get("dynamic") not in (False, None) or w.get("scale_dtype") not in scale_dtypes:
            raise fp8.FP8FormatError(f"{field}.weights: {wrong or w!r} is not {what}")


def _nvfp4(qc: dict, where: str):
    """compressed-tensors NVFP4 (llm-compressor's NVFP4 / NVFP4A16 schemes): every weight scheme 4-bit float,
    groups of 16, e4m3 scales under a global one."""
    from portllm.port_nvfp4 import NVFP4Checkpoint

    _one_scheme(qc, where, NVFP4_FORMAT, _NVFP4_WEIGHTS, (None, "torch.float8_e4m3fn"),
                "NVFP4 (4-bit float, symmetric, static, groups of 16 under a global scale, e4m3 scales)")
    return NVFP4Checkpoint()


def checkpoint_format(model_dir: str):
    """The quantized format of a checkpoint (config.json's ``quantization_config``): BlockFP8,
    CompressedFP8, ``port_mxfp4.MXFP4Checkpoint``, ``port_nvfp4.NVFP4Checkpoint``, or None for an unquantized one; FP8FormatError, naming
    the field, for a quantization portllm cannot merge into."""
    from portllm.files import open_regular

    path = os.path.join(model_dir, "config.json")
    try:
        with open_regular(path, "config", binary=False) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # (no readable config: the port's other checks say so where it matters)
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise fp8.FP8FormatError(f"{path}: quantization_config.weight_block_size is {block!r}; portllm merges "
                                     "into block-scaled FP8 ([rows, cols] blocks, e.g. [128, 128]) only")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise fp8.FP8FormatError(f"{path}: quantization_config.fmt is {qc.get('fmt')!r}; portllm merges into e4m3")
        scale_fmt = qc.get("scale_fmt") or "float"
        if scale_fmt not in ("float", "ue8m0"):
            raise fp8.FP8FormatError(f"{path}: quantization_config.scale_fmt is {scale_fmt!r}; portllm writes float "
                                     "or ue8m0 block scales")
        return BlockFP8((block[0], block[1]), scale_fmt)
    if method == "compressed-tensors":
        return _compressed(qc, path)
    if method == "mxfp4":
        from portllm.port_mxfp4 import MXFP4Checkpoint

        return MXFP4Checkpoint()
    raise fp8.FP8FormatError(f"{path}: the checkpoint is quantized (quant_method {method!r}), which portllm cannot "
                             "merge into; port onto the 16-bit release of the model instead")
