"""Will a patch help on the evolved model? ``check_portability`` answers from the outputs of four models
on the user's own prompts (no answers needed), before anything is ported.

Weights alone do not tell: how far θ′ moved from θ, or how its weights turned inside the patch's row
and column spaces, ranked ports poorly against measured retention (|Spearman ρ| ≤ 0.35 over 114 demo
ports), while outputs ranked them well. So the check runs θ, θ+Δ, θ′ and θ′+Δ on the prompts:

1. y* = θ+Δ's greedy continuation of each prompt (``max_new_tokens`` tokens, ending at its first
   end-of-sequence token): what the patch makes its own base answer, the behaviour the user fine-tuned for;
2. P(M) = the mean probability per token of y* under each model M, teacher-forced: how often M would
   give those answers (a rate, like the accuracy a user measures; the mean log-probability, also
   reported, is dominated by the few tokens a model finds nearly impossible, and ranked the demo's
   ports far worse: Spearman ρ 0.38 against 0.76 with 1-token answers, 0.00 against 0.60 with 8);
3. the patch's gain on θ, g = P(θ+Δ) − P(θ), and on θ′, g′ = P(θ′+Δ) − P(θ′);
4. **portability score** s = g′ / g: the share of its effect on its own base that the patch keeps on
   θ′ (1: all of it; 0: none; below 0: it pushes θ′ away from the fine-tuned answers);
5. **predicted harm** where g′ < 0: with the patch, θ′ gives the fine-tuned answers less often
   than θ′ alone (it already did better without it, or the patch now points elsewhere). Without
   labels the check cannot see where θ′ alone is right and θ+Δ's answers are wrong: a patch that
   moves θ′ toward wrong answers it learned on θ looks like help;
6. with ``calibrate``, the patch scale s in [0, 1.5] whose θ′ + s·Δ agrees best with θ+Δ: the least
   mean KL(θ+Δ ‖ θ′ + s·Δ) of the next-token distributions at the answer positions.

The patch is applied unmerged (forward hooks adding s·B·A·x on each patched Linear), and one model is
in memory at a time: θ is loaded, run with and without the patch, and freed before θ′ is loaded. Per
module, the diagnostics say how strongly the patch's update fires on each model's own activations,
‖ΔW·x‖ / ‖W·x‖ over the prompts' tokens, and the ratio of the two (below 1: θ′'s activations have
moved out of the patch's input space).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from portllm.patch import Patch

HARM_BELOW = 0.0  # predicted harm where the patch's gain on θ′ (probability per token) is below this
MIN_GAIN = 1e-3  # a patch that changes its own base's answers by less than this has no measurable effect


class PromptsError(ValueError):
    """The prompts file is missing, empty or not text; the message names it."""


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (``{"prompt": ...}`` per line; other fields, an
    answer included, are ignored). Blank lines are skipped."""
    from portllm.files import open_regular

    try:
        with open_regular(path, "prompts", binary=True) as f:
            raw = f.read()
    except OSError as e:
        raise PromptsError(f"prompts file {path}: {e.strerror or e}") from None
    if b"\0" in raw:
        raise PromptsError(f"prompts file {path}: not a text file (it holds NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptsError(f"prompts file {path}: not UTF-8 text (byte {e.start})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise PromptsError(f"prompts file {path}: no prompts (empty)")
    if path.endswith(".jsonl") or all(ln.startswith("{") for ln in lines):
        out = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except ValueError:
                raise PromptsError(f"prompts file {path}, line {i}: not JSON") from None
            p = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(p, str) or not p.strip():
                raise PromptsError(f"prompts file {path}, line {i}: no \"prompt\" string")
            out.append(p)
        return out
    return lines


@dataclass
class ModuleDiagnostic:
    name: str
    effect_base: float  # E‖ΔW·x‖ / E‖W·x‖ on θ's activations
    effect_evolved: float  # the same on θ′'s
    ratio: float  # E‖ΔW·x′‖ / E‖ΔW·x‖


@dataclass
class PortabilityReport:
    score: float | None
    harm: bool
    gain_base: float
    gain_evolved: float
    logprob: dict[str, float]  # per model: mean log p of y* per token (reported; not the score)
    agreement: dict[str, float]  # per model: share of y*'s tokens it predicts greedily
    prompts: int
    tokens: int
    modules: list[ModuleDiagnostic] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict[float, float] | None = None  # patch scale s -> mean KL(θ+Δ ‖ θ′ + s·Δ) per answer token
    scale: float | None = None  # the calibrated s (``calibrate=True``)
    patch_scale: float = 1.0  # the scale θ′ + s·Δ was judged at (``port --scale``)
    calibrated_score: float | None = None  # the portability score at the calibrated scale
    probability: dict[str, float] | None = None  # per model: mean probability of y*'s tokens
    calibrated_gain: float | None = None  # P(θ′ + s·Δ) − P(θ′) at the calibrated scale s

    @property
    def calibrated_harm(self) -> bool:
        """Harm predicted even at the calibrated scale: θ′ + s·Δ (s > 0) gives θ+Δ's answers less often
        than θ′ alone. (s = 0 is θ′ itself: never harm.)"""
        return bool(self.scale) and self.calibrated_gain is not None and self.calibrated_gain < HARM_BELOW

    def lines(self) -> list[str]:
        out = []
        if self.score is None:
            out.append(f"portability: not measurable: the patch barely changes its own base's answers to these "
                       f"{self.prompts} prompts (their probability moves {self.gain_base:+.4f} per token)")
        else:
            at = f" at scale {self.patch_scale:g}" if self.patch_scale != 1.0 else ""
            out.append(f"portability score {self.score:.2f}: on θ′ the patch{at} keeps {self.score:.0%} of its effect on "
                       f"its own base (it makes θ+Δ's greedy answers to the {self.prompts} prompts "
                       f"{self.gain_base:+.3f} more likely per token on θ, {self.gain_evolved:+.3f} on θ′)")
        a = self.agreement
        out.append(f"agreement with θ+Δ's answers ({self.tokens} tokens): θ {a['base']:.0%}, θ′ {a['evolved']:.0%}, "
                   f"θ′+Δ {a['evolved+patch']:.0%}")
        if self.harm:
            out.append("predicted harm: with the patch, θ′ gives the fine-tuned answers less often than θ′ alone "
                       f"(probability per token {self.gain_evolved:+.3f}); port with --ignore-harm only if you know better")
        else:
            out.append("predicted harm: no")
        if self.scale is not None:
            c = self.calibration
            out.append(f"calibration: θ′ + {self.scale:g}·Δ agrees best with θ+Δ on these prompts (mean KL per answer "
                       f"token {c[self.scale]:.4f} nats, against {c[1.0]:.4f} at scale 1 and {c[0.0]:.4f} without the "
                       "patch; scales tried " + ", ".join(f"{k:g}" for k in c) + ")")
            if self.calibrated_score is not None and self.score is not None:
                out.append(f"portability score at scale {self.scale:g}: {self.calibrated_score:.2f} (at scale "
                           f"{self.patch_scale:g}: {self.score:.2f})")
            if self.calibrated_harm:
                out.append(f"predicted harm at scale {self.scale:g} too: θ′ + {self.scale:g}·Δ gives the fine-tuned "
                           f"answers less often than θ′ alone (probability per token {self.calibrated_gain:+.3f})")
        worst = sorted(self.modules, key=lambda m: m.ratio)[:3]
        if worst:
            out.append("modules whose update fires least on θ′'s activations (‖ΔW·x′‖ / ‖ΔW·x‖): " + ", ".join(
                f"{m.name} {m.ratio:.2f}" for m in worst))
        return out

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("modules", "calibration")}
        d["calibration"] = None if self.calibration is None else {str(k): v for k, v in self.calibration.items()}
        d["modules"] = [m.__dict__ for m in self.modules]
        d["meaning"] = ("score = (P(θ′+Δ) − P(θ′)) / (P(θ+Δ) − P(θ)), P the mean probability per token of θ+Δ's "
                        "greedy answers to the prompts; harm predicted where P(θ′+Δ) < P(θ′)")
        return d


def _tokenizer(*dirs):
    from transformers import AutoTokenizer

    for d in dirs:
        if isinstance(d, str) and os.path.isdir(d):
            try:
                return AutoTokenizer.from_pretrained(d)
            except (OSError, ValueError):
                continue
    where = " or ".join(str(d) for d in dirs if isinstance(d, str)) or "the models given (loaded, not directories)"
    raise ValueError(f"no tokenizer in {where}: the check tokenizes the prompts with the model's own tokenizer "
                     "(pass tokenizer=)")


def _quantized_loading(path: str):
    """The quantization_config argument that makes transformers load a quantized checkpoint's weights
    dequantized (the check runs them in a plain dtype on any device), or None for a plain checkpoint."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            q = json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method is None:
        return None
    import transformers

    cls = {"compressed-tensors": "CompressedTensorsConfig", "fp8": "FineGrainedFP8Config",
           "mxfp4": "Mxfp4Config"}.get(method)
    if cls is None or not hasattr(transformers, cls):
        raise ValueError(f"{path}: quantization method {method!r} (config.json): the check loads quantized "
                         "checkpoints dequantized, and knows how for compressed-tensors, fp8 and mxfp4 only")
    return getattr(transformers, cls)(dequantize=True)


def _load(model, device, dtype):
    if isinstance(model, torch.nn.Module):
        return model
    from transformers import AutoModelForCausalLM

    kw = {}
    q = _quantized_loading(os.fspath(model))
    if q is not None:
        import warnings

        kw["quantization_config"] = q
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype or torch.float32, **kw)
        return m.to(device=device, dtype=dtype or torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype or torch.float32).to(device).eval()


def _device_of(models, device):
    """The device the check runs on: ``device``, else that of a loaded model given, else the CPU. A loaded
    model on another device is refused (the check does not move the caller's model)."""
    loaded = {str(next(m.parameters()).device) for m in models
              if isinstance(m, torch.nn.Module) and any(True for _ in m.parameters())}
    if device is None:
        if len(loaded) > 1:
            raise ValueError(f"the models given are on different devices ({', '.join(sorted(loaded))})")
        return torch.device(loaded.pop() if loaded else "cpu")
    device = torch.device(device)
    for d in loaded:
        if torch.device(d) != device and not (device.type == torch.device(d).type and device.index is None):
            raise ValueError(f"a model given is on {d}, the check runs on {device}: move it, or pass device={d!r}")
    if len(loaded) == 1 and device.index is None and torch.device(next(iter(loaded))).type == device.type:
        return torch.device(next(iter(loaded)))  # "cuda" for a model on cuda:1 means cuda:1
    return device


def _modules(model, patch: Patch) -> dict:
    mods = dict(model.named_modules())
    out = {}
    for name, m in patch.items():
        mod = mods.get(name)
        if not isinstance(mod, torch.nn.Linear):
            kind = "missing" if mod is None else type(mod).__name__
            raise ValueError(f"module {name}: the check applies a patch to Linear modules ({kind} here)")
        if tuple(mod.weight.shape) != m.weight_shape and not m.fan_in_fan_out:
            raise ValueError(f"module {name}: the patch's update is {m.weight_shape[0]}x{m.weight_shape[1]}, the "
                             f"model's weight {tuple(mod.weight.shape)}")
        out[name] = mod
    return out


class _Hooks:
    """Forward hooks on the patched Linears: ``add`` adds s·B·A·x to their outputs (the patch, unmerged);
    ``measure`` accumulates ‖ΔW·x‖ and ‖W·x‖ over the tokens of ``mask``."""

    def __init__(self, mods: dict, patch: Patch, device):
        self.factors = {n: (patch[n].A.float().to(device), (patch[n].B.float() * patch[n].scale).to(device))
                        for n in mods}
        self.add, self.measure, self.mask, self.scale = False, False, None, 1.0
        self.sums = {n: [0.0, 0.0] for n in mods}
        self.handles = [mod.register_forward_hook(self._hook(n)) for n, mod in mods.items()]

    def _hook(self, name):
        def hook(mod, args, out):
            if not (self.add or self.measure):
                return None
            A, B = self.factors[name]
            u = (args[0].float() @ A.T) @ B.T
            if self.measure:
                keep = self._keep(u)
                un, wn = u.norm(dim=-1), out.float().norm(dim=-1)
                if keep is not None:
                    un, wn = un * keep, wn * keep
                self.sums[name][0] += float(un.sum())
                self.sums[name][1] += float(wn.sum())
            return (out.float() + self.scale * u).to(out.dtype) if self.add else None
        return hook

    def _keep(self, u):
        """The real-token mask shaped like u's rows: [b, L] inputs, or the [b·L] rows of a module that
        flattens its input (a shared expert); None (every row) for a module that sees a subset of the
        tokens (a routed expert), where padding cannot be told apart."""
        m = self.mask
        if m is None:
            return None
        if tuple(u.shape[:-1]) == tuple(m.shape):
            return m.to(u.dtype)
        if u.dim() == 2 and u.shape[0] == m.numel():
            return m.reshape(-1).to(u.dtype)
        return None

    def remove(self):
        for h in self.handles:
            h.remove()


def _batch(seqs: list[list[int]], device):
    """Left-padded ids, attention mask and positions."""
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        mask[i, n - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _forward(model, ids, mask, pos, keep: int):
    """Logits of the last ``keep`` positions only (``logits_to_keep``, where the model takes it: the
    vocabulary projection and its [b, L, V] output are the largest cost of a short prompt)."""
    import inspect

    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    kw = {"logits_to_keep": keep} if takes else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits
    return logits[:, -keep:]


@torch.no_grad()
def _eos_ids(model) -> set[int]:
    """The model's end-of-sequence tokens (its generation config's, else its config's; an int or a list)."""
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is not None:
            return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    return set()


def _greedy(model, prompts: list[list[int]], steps: int, device, batch) -> list[list[int]]:
    """Each prompt's greedy continuation, up to ``steps`` tokens and ending at the first end-of-sequence
    token (kept): what follows an answer's end is not part of it, and is not scored."""
    eos = _eos_ids(model)
    seqs = [list(p) for p in prompts]
    done = [False] * len(seqs)
    for _ in range(steps):
        todo = [i for i, d in enumerate(done) if not d]
        if not todo:
            break
        nxt = []
        for i in range(0, len(todo), batch):
            ids, mask, pos = _batch([seqs[j] for j in todo[i:i + batch]], device)
            nxt += _forward(model, ids, mask, pos, 1)[:, -1].argmax(-1).tolist()
        for j, t in zip(todo, nxt):
            seqs[j].append(t)
            done[j] = t in eos
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@torch.no_grad()
def _score(model, prompts, targets, device, batch, hooks=None, keep=None, ref=None):
    """(Σ log p(y*), Σ greedy hits, tokens, Σ KL(ref ‖ model)) over the targets, teacher-forced; the hooks'
    mask set to the real tokens of each batch. ``keep``: a list that receives each prompt's log-probs at
    the target positions ([k, V]); ``ref``: such a list, to sum KL against."""
    seqs = [p + t for p, t in zip(prompts, targets)]
    lp = hits = n = 0
    prob = 0.0
    kl = 0.0
    for i in range(0, len(seqs), batch):
        ids, mask, pos = _batch(seqs[i:i + batch], device)
        if hooks is not None:
            hooks.mask = mask
        kmax = max(len(t) for t in targets[i:i + batch])
        if not kmax:
            continue
        # the positions predicting y*: the last kmax + 1 (left padding puts every answer at the end)
        logits = _forward(model, ids, mask, pos, kmax + 1).float()
        logp = torch.log_softmax(logits, -1)
        L = logits.shape[1]
        for j, t in enumerate(targets[i:i + batch]):
            k = len(t)
            if not k:
                continue
            rows = torch.arange(L - k - 1, L - 1, device=ids.device)
            tgt = ids[j, ids.shape[1] - k:]
            lp += float(logp[j, rows, tgt].sum())
            prob += float(logp[j, rows, tgt].exp().sum())
            hits += int((logits[j, rows].argmax(-1) == tgt).sum())
            if keep is not None:
                keep.append(logp[j, rows].cpu())
            if ref is not None:
                r = ref[i + j].to(logp.device)
                kl += float((r.exp() * (r - logp[j, rows])).sum())
            n += k
    return lp, hits, n, kl, prob


CALIBRATION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def check_portability(base, evolved, patch, prompts, *, tokenizer=None, device=None, dtype=None,
                      max_new_tokens: int = 8, batch: int = 16, calibrate: bool = False, scale: float = 1.0,
                      log=None) -> PortabilityReport:
    """The portability check (module docstring). ``base`` (θ, the patch's base) and ``evolved`` (θ′):
    checkpoint directories (loaded one at a time) or loaded causal LMs; ``patch``: a Patch or a path;
    ``prompts``: a list of strings or a path to a text/JSONL file (``read_prompts``); ``tokenizer``: by
    default the evolved model's (else the base's), from its directory. ``calibrate``: also the patch
    scale s in ``CALIBRATION_GRID`` that makes θ′ + s·Δ agree best with θ+Δ: the least mean KL(θ+Δ ‖
    θ′ + s·Δ) over the answer tokens' next-token distributions (a tie goes to the s nearest 1). It holds
    θ+Δ's distributions at those positions: tokens × vocabulary × 4 bytes. ``scale``: the patch scale a
    port would write (``port --scale``): θ′ + scale·Δ is what is judged against θ′ (θ+Δ, the fine-tune,
    is always at scale 1). ``device``: by default that of a loaded model given, else the CPU; a loaded
    model is run in eval mode and its mode put back."""
    t0 = time.perf_counter()
    if not isinstance(patch, Patch):
        patch = Patch.load(os.fspath(patch))
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(os.fspath(prompts))
    prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise PromptsError("no prompts: the check needs the user's task prompts (a text file, one per line, or JSONL)")
    if patch.expert_factors:
        raise ValueError("the check applies patches to Linear modules; this patch holds expert (3-D) parameters")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    device = _device_of((base, evolved), device)
    if isinstance(dtype, str):
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype {dtype!r}: the check runs in bfloat16, float16 or float32")
        dtype = getattr(torch, dtype)
    tok = tokenizer if tokenizer is not None else _tokenizer(evolved, base)
    ids = [tok(p)["input_ids"] for p in prompts]
    if any(not x for x in ids):
        raise PromptsError("a prompt tokenizes to nothing")
    stats: dict[str, tuple] = {}
    act: dict[str, dict] = {}
    targets = None
    kls: dict[float, float] = {}
    reference = None
    for which, src in (("base", base), ("evolved", evolved)):
        model = _load(src, device, dtype)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        hooks = _Hooks(_modules(model, patch), patch, device)
        try:
            if targets is None:  # θ+Δ's own answers
                hooks.add = True
                targets = _greedy(model, ids, max_new_tokens, device, batch)
                hooks.add = False
            hooks.measure = True
            stats[which] = _score(model, ids, targets, device, batch, hooks)
            hooks.measure = False
            act[which] = dict(hooks.sums)
            hooks.add, hooks.scale = True, (scale if which == "evolved" else 1.0)
            ref = [] if calibrate and which == "base" else None
            stats[which + "+patch"] = _score(model, ids, targets, device, batch, hooks, keep=ref)
            if ref is not None:
                reference = ref
            if calibrate and which == "evolved":
                for sc in CALIBRATION_GRID:
                    hooks.add, hooks.scale = sc != 0.0, sc
                    kls[sc] = _score(model, ids, targets, device, batch, hooks, ref=reference)
                hooks.scale = 1.0
        finally:
            hooks.remove()
            for m, mode in modes:
                m.train(mode)
        if log:
            log(f"portllm check: {which} done")
        # θ freed before θ′ is loaded: the modes list and the hooks hold references to its modules
        del modes, hooks
        if not isinstance(src, torch.nn.Module):
            model = None
            import gc

            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    lp = {k: v[0] / max(1, v[2]) for k, v in stats.items()}
    agree = {k: v[1] / max(1, v[2]) for k, v in stats.items()}
    pr = {k: v[4] / max(1, v[2]) for k, v in stats.items()}
    g, g2 = pr["base+patch"] - pr["base"], pr["evolved+patch"] - pr["evolved"]
    score = g2 / g if g > MIN_GAIN else None
    calib = chosen = cscore = cgain = None
    if calibrate:
        ntok = max(1, stats["base"][2])
        calib = {sc: r[3] / ntok for sc, r in kls.items()}
        chosen = min(calib, key=lambda sc: (calib[sc], abs(sc - 1)))
        cgain = kls[chosen][4] / ntok - pr["evolved"]
        if g > MIN_GAIN:
            cscore = cgain / g
    mods = []
    for name in act["base"]:
        (ub, wb), (ue, we) = act["base"][name], act["evolved"][name]
        mods.append(ModuleDiagnostic(name, ub / wb if wb else math.nan, ue / we if we else math.nan,
                                     ue / ub if ub else math.nan))
    return PortabilityReport(score, score is not None and g2 < HARM_BELOW, g, g2, lp, agree, len(prompts),
                             stats["base"][2], mods, time.perf_counter() - t0, calib, chosen, float(scale), cscore, pr,
                             cgain)
