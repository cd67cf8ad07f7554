"""How much of a patch survives each quantized format a port writes, measured: the README's table of
formats. One weight [1024, 2880] (N(0, 0.02), GPT-OSS's hidden size), quantized by each format's own
quantizer, and a rank-16 update whose norm is ``--rel`` of the weight's (1% by default, a LoRA patch's
usual size); the merge of each format (``portllm.fp8.merge_``, ``portllm.mxfp4.merge_``,
``portllm.nvfp4.merge_``, ``portllm.mxfp8.merge_``) with nearest
and stochastic rounding, stochastic averaged over 8 seeds (mean and the spread, min to max).

    retained = ⟨Q(W+Δ) − W, Δ⟩ / ‖Δ‖²          noise = ‖Q(W+Δ) − W − Δ‖ / ‖Δ‖

With ``--saturation``, instead: why NVFP4 with its scales kept and stochastic rounding keeps less than all
of the update: the groups whose largest value lies above 6 steps of their rounded e4m3 scale (code 6,
e2m1's largest, saturates there, and an update is lost in either direction), the largest such value
in steps, and the share of the update's energy on the elements above 6 steps.

Usage: python tools/format_retention.py [--rel 0.01] [--saturation]   (prints a Markdown table)
"""

import argparse

import torch

from portllm import fp8, mxfp4, mxfp8, nvfp4

R, K, RANK, SEEDS = 1024, 2880, 16, 8


def case(rel: float):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(R, K, generator=g) * 0.02
    B, A = torch.randn(R, RANK, generator=g), torch.randn(RANK, K, generator=g)
    B *= rel * float(W.norm() / (B @ A).norm())
    return W, B, A


def measure(rel: float) -> list[tuple[str, str, str, list]]:
    W, B, A = case(rel)
    rows = []
    q, s = fp8.quantize(W, (128, 128))
    ones = torch.ones(RANK)
    for rounding in ("nearest", "stochastic"):
        res = [fp8.merge_(q, s, B, A, ones, (128, 128), rounding=rounding, seed=seed)[2]
               for seed in (range(SEEDS) if rounding == "stochastic" else [0])]
        rows.append(("block FP8 (e4m3, float32 scale per 128x128)", "fresh (transformers' quantizer)", rounding, res))
    sc8 = mxfp8.fresh_scales(W)
    q8 = mxfp8.quantize(W, sc8)
    for rounding in ("nearest", "stochastic"):
        res = [mxfp8.merge_(q8, sc8, B, A, ones, rounding=rounding, seed=seed)[2]
               for seed in (range(SEEDS) if rounding == "stochastic" else [0])]
        rows.append(("MXFP8 (e4m3, e8m0 scale per 32)", "fresh (compressed-tensors' quantizer)", rounding, res))
    sc = mxfp4.fresh_scales(W)
    blocks = mxfp4.quantize(W, sc)
    for policy in mxfp4.POLICIES:
        for rounding in ("nearest", "stochastic"):
            res = [mxfp4.merge_(blocks[None], sc[None], {0: (B, A, 1.0)}, policy=policy, rounding=rounding,
                                seed=seed).kept for seed in (range(SEEDS) if rounding == "stochastic" else [0])]
            rows.append(("MXFP4 (e2m1, e8m0 scale per 32)", policy, rounding, res))
    g = nvfp4.global_scale_for(W.abs().max())
    sc = nvfp4.group_scales(W.reshape(R, -1, nvfp4.GROUP).abs().amax(-1), g)
    packed = nvfp4.quantize(W, sc, g)
    for policy in mxfp4.POLICIES:
        for rounding in ("nearest", "stochastic"):
            res = [nvfp4.merge_(packed, sc, g, B, A, 1.0, policy=policy, rounding=rounding, seed=seed).kept
                   for seed in (range(SEEDS) if rounding == "stochastic" else [0])]
            rows.append(("NVFP4 (e2m1, e4m3 scale per 16, fp32 global scale)", policy, rounding, res))
    return rows


def saturation(rel: float) -> dict:
    """NVFP4 reuse: where the kept e4m3 group scales leave values beyond e2m1's largest code (6 steps)."""
    W, B, A = case(rel)
    g = nvfp4.global_scale_for(W.abs().max())
    sc = nvfp4.group_scales(W.reshape(R, -1, nvfp4.GROUP).abs().amax(-1), g)
    d = nvfp4.steps(sc, g).repeat_interleave(nvfp4.GROUP, dim=1)  # the step of every element
    x = W.abs() / d
    above = x > 6
    upd = (B @ A).pow(2)
    return {"groups_above": float(above.reshape(R, -1, nvfp4.GROUP).any(-1).float().mean()),
            "max_steps": float(x.max()), "energy_above": float(upd[above].sum() / upd.sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rel", type=float, default=0.01, help="‖Δ‖ / ‖W‖ (default 0.01)")
    ap.add_argument("--saturation", action="store_true", help="instead, where NVFP4's kept scales saturate code 6")
    args = ap.parse_args()
    if args.saturation:
        s = saturation(args.rel)
        print(f"NVFP4, scales kept: {s['groups_above']:.1%} of the groups hold a value above 6 steps (up to "
              f"{s['max_steps']:.2f}); the elements above 6 steps carry {s['energy_above']:.1%} of the update's energy")
        return
    print(f"| format | scales | rounding | retained | noise |  (‖Δ‖ = {args.rel:g} ‖W‖, W {R}x{K}, rank {RANK})")
    print("|---|---|---|---|---|")
    for fmt_, policy, rounding, res in measure(args.rel):
        kept = [r.retained for r in res]
        noise = sum(r.noise for r in res) / len(res)
        spread = f" ({min(kept):.1%} to {max(kept):.1%}, {len(res)} seeds)" if len(res) > 1 else ""
        print(f"| {fmt_} | {policy} | {rounding} | {sum(kept) / len(kept):.1%}{spread} | {noise:.2f} |")


if __name__ == "__main__":
    main()
