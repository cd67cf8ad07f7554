"""Plots of the experiment's results (matplotlib, drawn off-screen)."""

from __future__ import annotations


def release_curves(results, path):
    """Accuracy of θ′, θ′ + Δ (ported) and θ′ re-fine-tuned against the vendor's continued pretraining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rels = results["releases"]
    xs = [r["continued_steps"] for r in rels]
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), sharey=True)
    for ax, task in zip(axes, tasks):
        row = results["tasks"][task]
        series = [("θ′ alone", "evolved", "k--"), ("θ′ + Δ LoRA (ported)", "ported_lora", "C0o-"),
                  ("θ′ + Δ PMSS (ported)", "ported_pmss", "C2s-"), ("θ′ re-fine-tuned (LoRA)", "refit", "C3^:")]
        for label, key, style in series:
            ax.plot(xs, [e[key] for e in row["releases"]], style, label=label)
        ax.axhline(row["theta+lora"], color="C0", alpha=0.3, lw=1)
        ax.set_title(task)
        ax.set_xlabel("vendor's continued pretraining (steps)")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("held-out accuracy")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Porting patches made on θ onto its evolved releases θ′")
    fig.tight_layout()
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
