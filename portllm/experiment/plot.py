"""Plots of the experiment's results (matplotlib, drawn off-screen)."""

from __future__ import annotations


def release_curves(results, path):
    """Accuracy of θ′, θ′ + Δ (ported) and θ′ re-fine-tuned against how far the vendor's release
    moved from θ (relative Frobenius norm of the weight change, the drift the README talks of), with
    θ + Δ (the patch on its own base) as horizontal reference lines. Series that coincide (1.0 is
    common) stay visible: each is drawn a little to the side of the others, with open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rels = results["releases"]
    xs = [100 * r["relative_weight_change"] for r in rels]
    span = (max(xs) - min(xs)) if len(xs) > 1 else 1.0
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    series = [("θ′ alone", "evolved", "k", "x", "--"), ("θ′ + Δ LoRA (ported)", "ported_lora", "C0", "o", "-"),
              ("θ′ + Δ PMSS (ported)", "ported_pmss", "C2", "s", "-"),
              ("θ′ re-fine-tuned (LoRA)", "refit", "C3", "^", ":")]
    for ax, task in zip(axes, tasks):
        row = results["tasks"][task]
        for i, (label, key, color, marker, ls) in enumerate(series):
            dx = (i - (len(series) - 1) / 2) * 0.012 * span  # side by side where values coincide
            ax.plot([x + dx for x in xs], [e[key] for e in row["releases"]], color=color, marker=marker, ls=ls,
                    mfc="none", ms=6, lw=1.2, label=label)
        ax.axhline(row["theta+lora"], color="C0", alpha=0.35, lw=1, label="θ + Δ LoRA (on its own base)")
        if "theta+pmss" in row:
            ax.axhline(row["theta+pmss"], color="C2", alpha=0.35, lw=1, ls="-.", label="θ + Δ PMSS (on its own base)")
        ax.set_title(task)
        ax.set_xlabel("release's drift from θ (% relative weight change)")
        ax.set_ylim(-0.04, 1.04)
    axes[0].set_ylabel("held-out accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("Porting patches made on θ onto its evolved releases θ′")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
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
