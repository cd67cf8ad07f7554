"""Plots of the experiment's results (matplotlib, drawn off-screen)."""

from __future__ import annotations


def release_curves(results, path):
    """Per task: test accuracy of θ′, θ′ + Δ (ported, LoRA and PMSS) and θ′ re-fine-tuned against the
    release (its mean drift from θ on the axis), mean over seeds with a band of ± one standard deviation,
    and θ + Δ as reference lines. Then the decay curve, aggregate retention per release for each patch
    type, and the portability check's score against the measured retention on every point (harmful
    ports marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rels = results["releases"]
    xs = list(range(1, len(rels) + 1))
    labels = [f"{r['name']}\n{r['relative_weight_change']['mean']:.0%}" for r in rels]
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks) + 2, figsize=(4.0 * (len(tasks) + 2), 3.9), squeeze=False)
    axes = axes[0]
    series = [("θ′ alone", "evolved", "k", "x", "--"), ("θ′ + Δ LoRA (ported)", "ported_lora", "C0", "o", "-"),
              ("θ′ + Δ PMSS (ported)", "ported_pmss", "C2", "s", "-"),
              ("θ′ re-fine-tuned (LoRA)", "refit", "C3", "^", ":")]
    for ax, task in zip(axes, tasks):
        t = results["tasks"][task]
        for i, (label, key, color, marker, ls) in enumerate(series):
            dx = (i - (len(series) - 1) / 2) * 0.04  # side by side where values coincide
            m = [c[key]["mean"] for c in t["releases"]]
            sd = [c[key]["sd"] for c in t["releases"]]
            x = [v + dx for v in xs]
            ax.plot(x, m, color=color, marker=marker, ls=ls, mfc="none", ms=6, lw=1.2, label=label)
            ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=color, alpha=0.12)
        ax.axhline(t["theta+lora"]["mean"], color="C0", alpha=0.35, lw=1, label="θ + Δ LoRA (on its own base)")
        ax.axhline(t["theta+pmss"]["mean"], color="C2", alpha=0.35, lw=1, ls="-.", label="θ + Δ PMSS (on its own base)")
        ax.set_title(task)
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_xlabel("release (drift from θ)")
        ax.set_ylim(-0.04, 1.04)
    axes[0].set_ylabel("test accuracy (mean ± sd over seeds)")
    handles, lab = axes[0].get_legend_handles_labels()
    ax = axes[len(tasks)]
    for m, color, marker in (("lora", "C0", "o"), ("pmss", "C2", "s")):
        ax.plot(xs, [v if v is not None else float("nan") for v in results["retention"][m]], color=color,
                marker=marker, label=f"{m.upper()} patches")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_title("decay: aggregate retention")
    ax.set_xlabel("release (drift from θ)")
    ax.set_ylabel("Σ(θ′+Δ − θ′) / Σ(θ+Δ − θ)")
    ax.legend(fontsize=7)
    ax = axes[len(tasks) + 1]
    pts = [p for s in results.get("per_seed", []) for p in s["points"]
           if p.get("retention") is not None and p["score_1"] is not None]
    for harmful, color, lbl in ((False, "C0", "not harmful"), (True, "C3", "harmful (θ′+Δ < θ′)")):
        sel = [p for p in pts if p["harmful"] == harmful]
        ax.scatter([p["score_1"] for p in sel], [p["retention"] for p in sel], s=12, color=color, alpha=0.7, label=lbl)
    ax.axvline(0.0, color="gray", lw=0.8, ls=":")
    ax.axhline(0.0, color="gray", lw=0.8, ls=":")
    rho = results["check"]["tokens_1"]["spearman"]
    ax.set_title("portability check (1 token)" + (f": ρ = {rho:.2f}" if rho is not None else ""))
    ax.set_xlabel("check score, before porting")
    ax.set_ylabel("measured retention R")
    ax.legend(fontsize=7)
    fig.legend(handles, lab, fontsize=7, loc="lower center", ncol=6, frameon=False)
    fig.suptitle(f"Porting patches made on θ onto its evolved releases θ′ ({len(results['seeds'])} seeds)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def task_bars(results, path):
    """Bar chart of the user-checkpoint mode: accuracy of each model on each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    models = list(next(iter(results["tasks"].values())))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.4))
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([t + i * w for t in range(len(tasks))], [results["tasks"][t][m] for t in tasks], w, label=m)
    ax.set_xticks([t + 0.4 - w / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
