"""The experiment's tables (markdown): what ``portllm demo`` prints and writes to table.md, and what the
README shows."""

from __future__ import annotations


def _ms(c: dict, digits: int = 2) -> str:
    if c["mean"] is None:
        return "n/a"
    return f"{c['mean']:.{digits}f} ± {c['sd']:.{digits}f}" if c["n"] > 1 else f"{c['mean']:.{digits}f}"


def _f(v, pct=False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0%}" if pct else f"{v:.2f}"


def table(results) -> str:
    rels, seeds = results["releases"], results["seeds"]
    lines = [f"Test-split accuracy, mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             "the learning rates chosen on the val split, per seed:", "",
             "| task | θ | θ+Δ LoRA | lr LoRA | θ+Δ PMSS | lr PMSS |", "|---" * 6 + "|"]
    for task, t in results["tasks"].items():
        lines.append(f"| {task} | {_ms(t['theta'])} | {_ms(t['theta+lora'])} | {', '.join(f'{x:g}' for x in t['lr_lora'])} "
                     f"| {_ms(t['theta+pmss'])} | {', '.join(f'{x:g}' for x in t['lr_pmss'])} |")
    lines += ["", "Each release θ′ alone, with the patch ported (θ′+Δ), and re-fine-tuned with LoRA (lr chosen the "
              "same way); retention R = (θ′+Δ − θ′) / (θ+Δ − θ) where the patch gains at least 0.1 on θ (n: "
              "seeds where it does); harmful: seeds where θ′+Δ < θ′:", "",
              "| task | release (drift) | θ′ | θ′+Δ LoRA | R LoRA (n) | θ′+Δ PMSS | R PMSS (n) | θ′ re-fine-tuned | "
              "harmful LoRA, PMSS |", "|---" * 9 + "|"]
    for task, t in results["tasks"].items():
        for r, c in zip(rels, t["releases"]):
            lines.append(f"| {task} | {r['name']} ({r['relative_weight_change']['mean']:.0%}) | {_ms(c['evolved'])} | "
                         f"{_ms(c['ported_lora'])} | {_ms(c['R_lora'])} ({c['R_lora']['n']}) | {_ms(c['ported_pmss'])} | "
                         f"{_ms(c['R_pmss'])} ({c['R_pmss']['n']}) | {_ms(c['refit'])} | "
                         f"{c['harmful_lora']}, {c['harmful_pmss']} of {len(seeds)} |")
    ret = results["retention"]
    lines += ["", "Retention in aggregate, Σ(θ′+Δ − θ′) / Σ(θ+Δ − θ) over tasks and seeds where the patch gains at "
              "least 0.1 on θ: " + "; ".join(
                  f"{r['name']} ({r['continued_steps']} steps): LoRA {_f(ret['lora'][k], True)}, PMSS "
                  f"{_f(ret['pmss'][k], True)}" for k, r in enumerate(rels)) + "."]
    harmful = results["harmful"]
    by_task = {t: sum(h["task"] == t for h in harmful) for t in results["tasks"]}
    lines.append(f"Harmful cells (θ′+Δ below θ′; each one is in results.json under \"harmful\"): {len(harmful)} of "
                 f"{len(seeds) * len(rels) * len(results['tasks']) * 2}, by task: "
                 + ", ".join(f"{t} {n}" for t, n in by_task.items()) + ".")
    lines += check_lines(results["check"])
    lines += quantized_lines(results)
    c = results.get("cost")
    if c and "check" in c:
        lines += ["", f"The check's cost on {rels[0]['name']} (seed {seeds[0]}; `portllm check` from the directories, "
                  f"{results['settings']['check_prompts']} prompts, 8 tokens, each in a process of its own): "
                  f"{c['check']['seconds']:.2f} s against {c['port']['seconds']:.2f} s for the port "
                  f"({c['check']['seconds'] / max(1e-9, c['port']['seconds']):.1f}×), peak memory "
                  f"{c['check']['peak_rss_above_baseline'] / 2**20:.1f} MiB."]
    if c:
        lines += ["", f"Cost on {rels[0]['name']} (seed {seeds[0]}): port {c['port']['seconds']:.2f} s, peak memory "
                  f"{c['port']['peak_rss_above_baseline'] / 2**20:.1f} MiB; re-fine-tuning (one lr) "
                  f"{c['refit']['seconds']:.2f} s, peak memory {c['refit']['peak_rss_above_baseline'] / 2**20:.1f} MiB "
                  f"(ratio {c['refit']['peak_rss_above_baseline'] / max(1, c['port']['peak_rss_above_baseline']):.0f}×)."]
    return "\n".join(lines) + "\n"


def check_lines(ck: dict) -> list[str]:
    lines = ["", f"The portability check (`portllm check`, before porting, from unlabeled val prompts) against what was "
             f"measured, over {ck['points']} points ({ck['seeds']} seeds × tasks × releases × patch types):", "",
             "| check scores | Spearman ρ with R (points) | harm predicted | harmful | caught | precision | recall |",
             "|---" * 7 + "|"]
    for tokens in (8, 1):
        t = ck[f"tokens_{tokens}"]
        lines.append(f"| θ+Δ's answers, {tokens} token{'s' if tokens > 1 else ''} | {_f(t['spearman'])} ({t['points']}) | "
                     f"{t['harm_predicted']} | {t['harmful']} | {t['harm_caught']} | {_f(t['precision'])} | "
                     f"{_f(t['recall'])} |")
    cal = ck["calibration"]
    lines += ["", f"Calibration (the 1-token check's `--calibrate`, ported at the scale it picks): {cal['fixed']} of "
              f"{cal['harmful']} harmful ports no longer harmful; the other {cal['others']} ports' mean retention "
              f"{_f(cal['others_retention'])} at scale 1, {_f(cal['others_retention_calibrated'])} calibrated."]
    return lines


def quantized_lines(results) -> list[str]:
    lines = []
    f8 = results.get("fp8")
    if f8:
        name = f8["release"]
        lines += ["", f"{name} of seed {f8['seed']} also released in block-FP8 ({f8['block'][0]}x{f8['block'][1]} "
                  "blocks), the LoRA patch ported onto it (accuracy; the fraction of the patch that survived "
                  "requantization, as the port reported it):", "",
                  f"| task | {name} | {name}+Δ LoRA (port) | {name} FP8 | {name} FP8+Δ LoRA, nearest | "
                  f"{name} FP8+Δ LoRA, stochastic | retained, nearest | retained, stochastic |",
                  "|---" * 8 + "|"]
        for task, e in f8["tasks"].items():
            lines.append(f"| {task} | {e['evolved']:.2f} | {e['ported_lora']:.2f} | {e['evolved_fp8']:.2f} | "
                         f"{e['ported_nearest']:.2f} | {e['ported_stochastic']:.2f} | {e['retained_nearest']:.3f} | "
                         f"{e['retained_stochastic']:.3f} |")
    nv = results.get("nvfp4")
    if nv:
        name = nv["release"]
        lines += ["", f"{name} of seed {nv['seed']} also released in NVFP4 (e2m1 codes, an e4m3 scale per 16, a "
                  "global scale), the LoRA patch ported onto it with the default scale policy, reuse (accuracy; the "
                  "fraction of the patch that survived, as the port reported it; the weights the patch outgrew, whose "
                  "global scale could not hold the merged weight, requantized fresh):", "",
                  f"| task | {name} | {name}+Δ LoRA (port) | {name} NVFP4 | {name} NVFP4+Δ LoRA, nearest | "
                  f"{name} NVFP4+Δ LoRA, stochastic | retained, nearest | retained, stochastic | requantized fresh |",
                  "|---" * 9 + "|"]
        for task, e in nv["tasks"].items():
            lines.append(f"| {task} | {e['evolved']:.2f} | {e['ported_lora']:.2f} | {e['evolved_nvfp4']:.2f} | "
                         f"{e['ported_nearest']:.2f} | {e['ported_stochastic']:.2f} | {e['retained_nearest']:.3f} | "
                         f"{e['retained_stochastic']:.3f} | {e['refreshed'][0]} of {e['refreshed'][1]} |")
    return lines
