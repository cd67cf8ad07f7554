"""``Patch``: per-module low-rank updates ΔW = scale · B @ A, read from and written as PEFT LoRA
adapters.

A patch maps module names of the model it applies to (``model.layers.0.self_attn.q_proj``) to
factors ``B [out, r]`` and ``A [r, in]`` and a scale, so that the module's weight becomes
``W + scale · B @ A`` (for GPT-2-style ``Conv1D`` weights stored ``[in, out]``, ``fan_in_fan_out``,
the transpose of that update). Metadata: the base model it was made from (name or path, and sketches
of its weights, see ``portllm.fingerprint``), the portllm version, where it came from.

Files: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), read and
written; PEFT loads what portllm writes. Safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from portllm import fingerprint as fp
from portllm._version import __version__
from portllm.atomic import check_disjoint, staging_dir, write_json
from portllm.experts import ExpertFactors, is_expert_key
from portllm.files import NotARegularFileError, open_regular
from portllm.safetensors_io import SafetensorsError, SafetensorsReader, write_tensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")


class PatchFormatError(ValueError):
    """A patch file portllm cannot read, or will not merge because it would merge it wrongly."""


@dataclass
class PatchModule:
    B: torch.Tensor  # [out, r]
    A: torch.Tensor  # [r, in]
    scale: float
    fan_in_fan_out: bool = False  # the weight is stored [in, out]: the update applies to W.T

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the weight this module's update applies to, as stored."""
        out_f, in_f = self.B.shape[0], self.A.shape[1]
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)

    def delta(self) -> torch.Tensor:
        """The dense update in fp32, in the weight's stored orientation (for checks, not merging)."""
        d = self.scale * (self.B.float() @ self.A.float())
        return d.t() if self.fan_in_fan_out else d

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.weight_shape))
        return (f"PatchModule(weight {shape}, rank {self.rank}, scale {self.scale:g}, "
                f"{str(self.B.dtype).removeprefix('torch.')}{', fan_in_fan_out' if self.fan_in_fan_out else ''})")


@dataclass
class Patch:
    modules: dict[str, PatchModule]
    base_model: str | None = None
    base_sketches: dict[str, dict] = field(default_factory=dict)  # module name -> fingerprint.sketch
    source: str = ""
    extra: dict = field(default_factory=dict)
    version: str = ""
    # LoRA on mixture-of-experts parameters (PEFT's target_parameters), as saved: resolved against a model
    # or checkpoint by portllm.experts (``expert_config``: the adapter config's r, lora_alpha, patterns,
    # target_parameters; ``expert_scale``: a factor on every expert scale, from ``scaled``).
    expert_factors: dict = field(default_factory=dict)
    expert_config: dict = field(default_factory=dict)
    expert_scale: float = 1.0
    # Once resolved onto a model or checkpoint (for_model, for_checkpoint): the experts.ExpertLoRA the
    # expert factors became, for the compatibility report's per-expert summary.
    resolved_experts: list = field(default_factory=list)

    def __post_init__(self):
        if not self.version:
            self.version = __version__

    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        nbytes = sum(m.B.numel() * m.B.element_size() + m.A.numel() * m.A.element_size() for m in self.modules.values())
        nbytes += sum(f.B.numel() * f.B.element_size() + f.A.numel() * f.A.element_size()
                      for f in self.expert_factors.values())
        experts = f", {len(self.expert_factors)} expert parameters" if self.expert_factors else ""
        return (f"Patch({len(self.modules)} modules{experts}, ranks {ranks}, {nbytes / 2**20:.2f} MiB of factors, "
                f"base_model={self.base_model!r}, source={self.source!r})")

    # -- views -----------------------------------------------------------------------------------
    def __len__(self):
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules)

    def __getitem__(self, name: str) -> PatchModule:
        return self.modules[name]

    def items(self):
        return self.modules.items()

    @property
    def rank(self) -> int:
        """The most common rank (modules may differ)."""
        return Counter(m.rank for m in self.modules.values()).most_common(1)[0][0] if self.modules else 0

    @property
    def base_fingerprint(self) -> str | None:
        return fp.fingerprint(self.base_sketches) if self.base_sketches else None

    def scaled(self, s: float) -> Patch:
        """The same patch with every scale multiplied by s."""
        mods = {k: PatchModule(m.B, m.A, m.scale * s, m.fan_in_fan_out) for k, m in self.modules.items()}
        return Patch(mods, self.base_model, self.base_sketches, self.source, dict(self.extra), self.version,
                     dict(self.expert_factors), dict(self.expert_config), self.expert_scale * s)

    def for_model(self, model) -> Patch:
        """This patch with its expert LoRA (if any) resolved onto ``model``'s fused expert parameters
        (``portllm.experts``): expert e of parameter P becomes the module ``"P[e]"``."""
        if not self.expert_factors:
            return self
        from portllm import experts

        resolved = experts.resolve(self.expert_factors, self.expert_config, model, self.expert_scale)
        return self._with(experts.for_model(resolved), resolved)

    def for_checkpoint(self, checkpoint_dir: str, keys) -> Patch:
        """This patch with its expert LoRA (if any) resolved onto a checkpoint's own tensors, as
        transformers saves the model that ``checkpoint_dir``'s config.json describes."""
        if not self.expert_factors:
            return self
        from portllm import experts

        model = experts.meta_model(checkpoint_dir)
        resolved = experts.resolve(self.expert_factors, self.expert_config, model, self.expert_scale)
        return self._with(experts.for_checkpoint(resolved, model, keys), resolved)

    def _with(self, expert_modules: dict, resolved: list) -> Patch:
        clash = sorted(set(expert_modules) & set(self.modules))
        if clash:
            raise PatchFormatError(f"module {clash[0]} is patched both as a module and as part of an expert parameter")
        return Patch({**self.modules, **expert_modules}, self.base_model, self.base_sketches, self.source,
                     dict(self.extra), self.version, resolved_experts=[x for x in resolved if not x.plain])

    def summary(self) -> list[dict]:
        """One row per module: name, shape, rank, scale, ‖ΔW‖_F, factor bytes."""
        rows = []
        for name, m in self.modules.items():
            # ‖s·B·A‖_F = |s|·‖(BᵀB)^½ A‖_F, computed from r×r and r×n products only.
            gram = m.B.double().t() @ m.B.double()
            norm = abs(m.scale) * math.sqrt(max(0.0, float(((gram @ m.A.double()) * m.A.double()).sum())))
            rows.append({"module": name, "shape": list(m.weight_shape), "rank": m.rank, "scale": m.scale,
                         "delta_norm": norm, "dtype": str(m.B.dtype).removeprefix("torch."),
                         "bytes": m.B.numel() * m.B.element_size() + m.A.numel() * m.A.element_size()})
        return rows

    # -- files -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> Patch:
        """Reads a PEFT LoRA adapter directory (or its adapter_model.safetensors), PEFT's or portllm's."""
        path = os.fspath(path)
        if os.path.isfile(path) and path.endswith(".safetensors"):
            path = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(path):
            raise PatchFormatError(f"{path}: no such patch directory")
        cfg_path = os.path.join(path, CONFIG)
        weights = os.path.join(path, WEIGHTS)
        if not os.path.exists(weights):
            bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
            if bins:
                raise PatchFormatError(
                    f"{os.path.join(path, bins[0])}: pickled weights are refused (loading them can run "
                    "arbitrary code). If you trust the file, convert it once: python -c \"import torch; "
                    "from safetensors.torch import save_file; save_file(torch.load('adapter_model.bin', "
                    "weights_only=True), 'adapter_model.safetensors')\" in that directory.")
            raise PatchFormatError(f"{path}: no {WEIGHTS}")
        if not os.path.exists(cfg_path):
            raise PatchFormatError(f"{path}: no {CONFIG} (is this a PEFT adapter directory?)")
        try:
            with open_regular(cfg_path, "adapter config", binary=False) as f:
                cfg = json.load(f)
        except NotARegularFileError as e:
            raise PatchFormatError(str(e)) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise PatchFormatError(f"{cfg_path}: cannot read ({e})") from None
        if not isinstance(cfg, dict):
            raise PatchFormatError(f"{cfg_path}: expected a JSON object, got a {type(cfg).__name__}")
        _check_supported(cfg, cfg_path)
        try:
            with SafetensorsReader(weights) as rd:
                tensors = {k: rd[k] for k in rd.keys()}
                meta = rd.metadata
        except SafetensorsError as e:
            raise PatchFormatError(str(e)) from None
        return _from_peft(cfg, tensors, meta, weights, cfg_path)

    def save(self, path: str, overwrite: bool = False, *, inputs: dict[str, str] | None = None) -> str:
        """Writes a PEFT-compatible adapter directory; written whole into a temporary directory
        and renamed into place, so an interrupted save never leaves a half patch. ``inputs``
        (description -> path) are directories that ``path`` must neither be, lie in, nor contain."""
        path = os.fspath(path)
        check_disjoint(path, inputs or {})
        if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
        if not self.modules and not self.expert_factors:
            raise ValueError("cannot save an empty patch")
        cfg, tensors = _to_peft(self)
        with staging_dir(path) as tmp:
            write_json(os.path.join(tmp, CONFIG), cfg, indent=2)
            meta = {"format": "pt", "portllm": json.dumps({
                "version": self.version, "source": self.source, "base_model": self.base_model,
                "base_sketches": self.base_sketches, "extra": self.extra})}
            write_tensors(os.path.join(tmp, WEIGHTS), tensors, meta)
        from portllm.vllm_limits import unservable

        why = unservable(self)
        if why:
            warnings.warn(f"{path}: {why}", stacklevel=2)
        return path


def _check_supported(cfg: dict, where: str):
    """Refuses the PEFT variants whose merge is not W + scale·B·A."""
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise PatchFormatError(f"{where}: peft_type {kind} is not a LoRA adapter; portllm merges LoRA only")
    refuse = {
        "use_dora": "DoRA rescales each weight column by a learned magnitude, which is not a low-rank patch",
        "lora_bias": "lora_bias adds a trained bias that a low-rank patch does not hold",
        "modules_to_save": "modules_to_save holds full copies of whole modules, not low-rank updates",
        "trainable_token_indices": "trainable token embeddings are not a low-rank patch",
        "layer_replication": "layer_replication changes the model's structure",
    }
    for key, why in refuse.items():
        if cfg.get(key):
            raise PatchFormatError(f"{where}: {key}={cfg[key]!r} is not supported: {why}")
    if cfg.get("alora_invocation_tokens"):
        raise PatchFormatError(f"{where}: alora_invocation_tokens is set: an activated LoRA (aLoRA) applies only "
                               "after its invocation tokens, which a merged weight cannot do")
    if cfg.get("bias", "none") != "none":
        raise PatchFormatError(f"{where}: bias={cfg['bias']!r} is not supported: the adapter trained biases, "
                               "which a low-rank patch does not hold")


def _pattern_value(patterns: dict, name: str, default, field_name: str, where: str):
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise PatchFormatError(f"{where}: {field_name} must be an object of module pattern -> value")
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", name)
        except re.error as e:
            raise PatchFormatError(f"{where}: {field_name}: {key!r} is not a valid regular expression ({e})") from None
        if hit:
            return value
    return default


def _positive_int(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise PatchFormatError(f"{where}: {what} must be a positive integer, got {value!r}")
    return int(value)


def _finite(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PatchFormatError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def _from_peft(cfg: dict, tensors: dict, meta: dict, where: str, cfg_path: str = "") -> Patch:
    cfg_path = cfg_path or where
    factors: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_embedding" in key:
                raise PatchFormatError(f"{where}: {key}: LoRA on embedding layers is not supported")
            raise PatchFormatError(f"{where}: unexpected tensor {key!r} (not a LoRA factor); refusing rather "
                                   "than dropping part of the adapter")
        adapters.add(m["adapter"])
        factors.setdefault(m["name"], {})[m["which"]] = t
    targets = cfg.get("target_parameters") or []
    if targets and not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        raise PatchFormatError(f"{cfg_path}: target_parameters must be a list of parameter names, got {targets!r}")
    expert_factors = {}
    for name in [n for n in factors if targets and is_expert_key(n, targets, cfg.get("target_modules"))]:
        ab = factors.pop(name)
        if set(ab) != {"A", "B"}:
            raise PatchFormatError(f"{where}: {name} has no {'lora_B' if 'B' not in ab else 'lora_A'}.weight")
        if ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["B"].shape[1] != ab["A"].shape[0]:
            raise PatchFormatError(f"{where}: {name}: lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)} "
                                   "are not [E·r, in] and [out, E·r]")
        expert_factors[name] = ExpertFactors(name, ab["B"], ab["A"])
    if len(adapters) > 1:
        names = ", ".join(sorted(a or "(unnamed)" for a in adapters))
        raise PatchFormatError(f"{where}: holds the factors of {len(adapters)} adapters ({names}); a patch is one "
                               "adapter: save each with its own save_pretrained(selected_adapters=[...])")
    if not factors and not expert_factors:
        raise PatchFormatError(f"{where}: no LoRA factors")
    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    r_default = _positive_int(r_default, "r", cfg_path)
    alpha_default = _finite(alpha_default, "lora_alpha", cfg_path)
    rslora, fifo = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    modules = {}
    for name, ab in factors.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "B" not in ab else "lora_A"
            raise PatchFormatError(f"{where}: module {name} has no {missing}.weight")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise PatchFormatError(f"{where}: module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                   "are not [r, in] and [out, r]")
        r = _positive_int(_pattern_value(cfg.get("rank_pattern"), name, r_default, "rank_pattern", cfg_path),
                          f"rank_pattern value for {name}", cfg_path)
        if r != A.shape[0]:
            raise PatchFormatError(f"{where}: module {name}: the config says rank {r}, lora_A has {A.shape[0]}")
        alpha = _finite(_pattern_value(cfg.get("alpha_pattern"), name, alpha_default, "alpha_pattern", cfg_path),
                        f"alpha_pattern value for {name}", cfg_path)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[name] = PatchModule(B, A, scale, fifo)
    info = _portllm_metadata(meta, where)
    expert_config = {k: cfg.get(k) for k in ("target_parameters", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                             "use_rslora")} if expert_factors else {}
    return Patch(modules, base_model=info.get("base_model") or cfg.get("base_model_name_or_path"),
                 base_sketches=info.get("base_sketches") or {}, source=info.get("source") or "peft",
                 extra=info.get("extra") or {}, version=info.get("version") or "",
                 expert_factors=expert_factors, expert_config=expert_config)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _portllm_metadata(meta: dict, where: str) -> dict:
    """The ``portllm`` metadata entry of a patch file, validated field by field: {} if absent."""
    if "portllm" not in meta:
        return {}
    try:
        info = json.loads(meta["portllm"])
    except (json.JSONDecodeError, RecursionError):
        raise PatchFormatError(f"{where}: corrupt portllm metadata (not JSON)") from None
    if not isinstance(info, dict):
        raise PatchFormatError(f"{where}: the portllm metadata is a JSON {type(info).__name__}, not an object")
    for key in ("base_model", "source", "version"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise PatchFormatError(f"{where}: portllm metadata field {key!r} must be a string")
    if info.get("extra") is not None and not isinstance(info["extra"], dict):
        raise PatchFormatError(f"{where}: portllm metadata field 'extra' must be an object")
    sketches = info.get("base_sketches")
    if sketches is not None:
        if not isinstance(sketches, dict):
            raise PatchFormatError(f"{where}: portllm metadata field 'base_sketches' must be an object of module "
                                   "-> sketch")
        for name, sk in sketches.items():
            ok = (isinstance(sk, dict) and isinstance(sk.get("shape"), list)
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sk["shape"])
                  and isinstance(sk.get("sample"), list) and all(_is_number(v) for v in sk["sample"])
                  and _is_number(sk.get("norm")))
            if not ok:
                raise PatchFormatError(f"{where}: base_sketches[{name!r}] is malformed (expected "
                                       "{\"shape\": [ints], \"norm\": number, \"sample\": [numbers]})")
    return info


def _tidy(alpha: float) -> float:
    """PEFT's alpha from a scale product, tidied of the last-bit noise of that product."""
    return float(f"{alpha:.15g}")


def _peft_adapter(patch: Patch, **fields) -> tuple[dict, dict]:
    """(adapter_config, tensors) of a PEFT LoRA adapter: the config's fixed fields plus ``fields``, and
    every factor pair (plain modules, then expert parameters) under PEFT's keys."""
    fifo = {m.fan_in_fan_out for m in patch.modules.values()}
    if len(fifo) > 1:
        raise ValueError("a PEFT adapter is either fan_in_fan_out or not: this patch mixes both")
    cfg = {"peft_type": "LORA", "task_type": patch.extra.get("task_type"), **fields,
           "target_modules": sorted(patch.modules), "base_model_name_or_path": patch.base_model,
           "fan_in_fan_out": bool(fifo and fifo.pop()), "use_dora": False, "bias": "none", "lora_dropout": 0.0,
           "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    pairs = [(name, m.A, m.B) for name, m in patch.modules.items()]
    pairs += [(key, f.A, f.B) for key, f in patch.expert_factors.items()]
    tensors = {}
    for name, A, B in pairs:
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    return cfg, tensors


def _to_peft(patch: Patch) -> tuple[dict, dict]:
    if patch.expert_factors:
        return _to_peft_experts(patch)
    r = patch.rank
    # PEFT's scale is alpha / r: alpha = scale * r.
    alphas = {k: _tidy(m.scale * m.rank) for k, m in patch.modules.items()}
    alpha = Counter(alphas[k] for k, m in patch.modules.items() if m.rank == r).most_common(1)[0][0]
    return _peft_adapter(patch, r=r, lora_alpha=alpha,
                         rank_pattern={k: m.rank for k, m in patch.modules.items() if m.rank != r},
                         alpha_pattern={k: a for k, a in alphas.items() if a != alpha}, use_rslora=False)


def _to_peft_experts(patch: Patch) -> tuple[dict, dict]:
    """A PEFT adapter with ``target_parameters``: the expert factors under their own keys (nesting
    included), the expert config's r, alpha and patterns (alphas times ``expert_scale``); the plain
    modules, if any, with explicit rank and alpha patterns, listed first so that they match first."""
    ec = patch.expert_config
    rslora = bool(ec.get("use_rslora"))
    s = patch.expert_scale
    rank_pattern = {k: m.rank for k, m in patch.modules.items()}
    alpha_pattern = {k: _tidy(m.scale * (math.sqrt(m.rank) if rslora else m.rank)) for k, m in patch.modules.items()}
    rank_pattern.update(ec.get("rank_pattern") or {})
    alpha_pattern.update({k: _tidy(v * s) for k, v in (ec.get("alpha_pattern") or {}).items()})
    return _peft_adapter(patch, r=ec.get("r", 8), lora_alpha=_tidy(ec.get("lora_alpha", 8) * s),
                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                         target_parameters=list(ec.get("target_parameters") or []), use_rslora=rslora)
