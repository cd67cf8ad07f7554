"""Plots of a results JSON into docs/, for the README:

    python benchmarks/plots.py benchmarks/results/<device>.json     # writes docs/<device>-*.png

* ``<device>-patch_add.png``: patch_add_'s speed as a fraction of the copy bandwidth measured in the
  same run (GPU) or of the fastest pass over W's bytes in the same run (CPU: copy, bf16 or integer
  in-place), per provider, shape and rank (bf16 W, bf16 factors);
* ``<device>-train.png``: PMSS's tokens/s and peak memory relative to PEFT LoRA's, per model
  (when the run has the training suite).
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def patch_add(d: dict, out: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = d["device"]["type"] == "cuda"
    key = "fraction_of_copy_bandwidth" if gpu else "fraction_of_fastest_pass"
    rows = [r for r in d["results"] if r["op"] == "patch_add_" and r.get("case") == "single"
            and r.get("factor_dtype", "bfloat16") == "bfloat16" and key in r
            and r["provider"] not in ("copy", "in-place", "in-place int", "fma-floor")]
    if not rows:
        return None
    cases = sorted({(r["m"], r["n"], r["r"]) for r in rows})
    provs = []
    for r in rows:
        p = r["provider"] + (f"@{r['isa']}" if r.get("isa") else "")
        if p not in provs:
            provs.append(p)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases)), 3.6))
    w = 0.8 / len(provs)
    for k, p in enumerate(provs):
        vals = []
        for c in cases:
            hit = [r[key] for r in rows if (r["m"], r["n"], r["r"]) == c
                   and r["provider"] + (f"@{r['isa']}" if r.get("isa") else "") == p]
            vals.append(hit[0] if hit else 0)
        ax.bar([i + k * w for i in range(len(cases))], vals, w, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{m}×{n}\nr={r}" for m, n, r in cases], fontsize=7)
    ax.set_ylabel("fraction of " + ("copy bandwidth" if gpu else "the fastest pass over W"))
    ax.set_title(f"patch_add_, bf16 W and factors — {d['device']['name']}", fontsize=9)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def train(d: dict, out: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in d["results"] if r["op"] == "train_step" and "tokens_per_s_vs_lora" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    models = [r["model"] for r in rows]
    ax.bar([i - 0.2 for i in range(len(rows))], [r["tokens_per_s_vs_lora"] for r in rows], 0.4, label="tokens/s")
    ax.bar([i + 0.2 for i in range(len(rows))], [r.get("memory_vs_lora", 0) for r in rows], 0.4,
           label="peak memory")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(models)
    ax.set_ylabel("PMSS r=256 / PEFT LoRA r=8")
    ax.set_title(f"one training step — {d['device']['name']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        with open(path) as f:
            d = json.load(f)
        stem = os.path.join(ROOT, "docs", os.path.basename(path).removesuffix(".json"))
        for made in (patch_add(d, stem + "-patch_add.png"), train(d, stem + "-train.png")):
            if made:
                print("wrote", os.path.relpath(made, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
