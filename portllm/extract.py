"""``extract_patch``: a low-rank patch from a full fine-tune, by truncated SVD of each ΔW."""

from __future__ import annotations

import os

import torch

from portllm import fingerprint as fp
from portllm.checkpoint import weights
from portllm.extract_experts import expert_params, extract_experts
from portllm.patch import Patch, PatchModule
from portllm.targets import matches

# Never part of a patch: embeddings and the output head are vocabulary-sized and rarely low-rank.
_SKIP = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings")


def _candidates(base, ft, target_modules, skip=frozenset()) -> list[str]:
    names = []
    for key in base.keys():
        if not key.endswith(".weight") or key in skip:
            continue
        shape = base.shape(key)
        if shape is None or len(shape) != 2:
            continue
        module = key[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        if target_modules is not None:
            if not matches(module, target_modules):
                continue
        elif leaf in _SKIP:
            continue
        if ft.shape(key) is None:
            raise ValueError(f"the fine-tuned model has no {key}")
        if tuple(ft.shape(key)) != tuple(shape):
            raise ValueError(f"{key}: base {tuple(shape)} but fine-tuned {tuple(ft.shape(key))}")
        names.append(module)
    return names


def extract_patch(base, finetuned, rank: int | None = None, energy: float | None = None, *,
                  target_modules=None, device=None, niter: int = 4, seed: int = 0,
                  dtype: torch.dtype = torch.float32, min_change: float = 0.0, progress: bool = False) -> Patch:
    """Patch ΔW_i ≈ B_i·A_i for every 2-D weight that differs between ``base`` and ``finetuned``
    (models or checkpoint directories; embeddings and the output head are skipped unless named in
    ``target_modules``), and an expert LoRA for every fused mixture-of-experts parameter that differs,
    per expert, in PEFT's ``target_parameters`` format (``portllm.extract_experts``; the rank is one
    per parameter: with ``energy``, the largest any of its experts needs).

    ``rank=r``: randomized SVD (``torch.svd_lowrank``, ``niter`` power iterations, seeded) keeps the
    top r singular triplets. ``energy=e``: exact SVD, and the smallest rank that keeps a fraction e of
    ‖ΔW‖_F² per module. Runs on ``device`` (default: cuda if available). ``patch.extra["energy_kept"]``
    reports, per module (per expert ``"P[e]"``), the fraction of ‖ΔW‖_F² the patch keeps;
    B = U·diag(σ), A = Vᵀ, scale 1.
    ``progress``: a progress bar over the modules (stderr).
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= or energy=")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    b_src, f_src = weights(base), weights(finetuned)
    modules, sketches, kept = {}, {}, {}
    bar = None
    try:
        params = expert_params(base, finetuned, b_src, f_src, target_modules)
        names = _candidates(b_src, f_src, target_modules, {k for x in params for k in x.keys(b_src)})
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(names) + len(params), unit="module", desc="portllm extract", leave=False)
        expert_factors, expert_config, kept = extract_experts(
            params, b_src, f_src, rank, energy, device=device, niter=niter, seed=seed, dtype=dtype,
            min_change=min_change, bar=bar)
        for name in names:
            if bar is not None:
                bar.update(1)
            key = name + ".weight"
            Wb = b_src.tensor(key)
            dW = f_src.tensor(key).to(device, torch.float32) - Wb.to(device, torch.float32)
            total = float(torch.linalg.matrix_norm(dW).item()) ** 2
            if total <= (min_change * float(torch.linalg.matrix_norm(Wb.float()).item())) ** 2 or total == 0.0:
                continue
            if rank is not None:
                q = min(rank, *dW.shape)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    U, S, V = torch.svd_lowrank(dW, q=min(q + 8, *dW.shape), niter=niter)
                U, S, Vh = U[:, :q], S[:q], V[:, :q].t()
            else:
                U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
                frac = torch.cumsum(S.double() ** 2, 0) / total
                q = int(torch.searchsorted(frac, torch.tensor(energy, dtype=torch.float64, device=frac.device)).item()) + 1
                q = min(q, S.numel())
                U, S, Vh = U[:, :q], S[:q], Vh[:q]
            kept[name] = float((S.double() ** 2).sum().item() / total)
            modules[name] = PatchModule((U * S).to("cpu", dtype).contiguous(), Vh.to("cpu", dtype).contiguous(), 1.0)
            sketches[name] = fp.sketch(Wb)
    finally:
        if bar is not None:
            bar.close()
        for src in (b_src, f_src):
            if hasattr(src, "close"):
                src.close()
    if not modules and not expert_factors:
        raise ValueError("the fine-tuned model's weights equal the base's: nothing to extract")
    base_name = os.fspath(base) if isinstance(base, (str, os.PathLike)) else \
        getattr(getattr(base, "config", None), "_name_or_path", None) or None
    return Patch(modules, base_model=base_name, base_sketches=sketches, source="extract",
                 expert_factors=expert_factors, expert_config=expert_config, extra={"energy_kept": kept, "method": "rank" if rank is not None else "energy",
                        "rank" if rank is not None else "energy": rank if rank is not None else energy})
