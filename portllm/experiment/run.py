"""The portability experiment (PortLLM, arXiv 2410.10870) end to end, at a CPU-sized scale:

1. pretrain a small Llama θ on a synthetic corpus (tokenizer made in code);
2. evolve it: continued pretraining on a shifted corpus, in successive releases θ′₁, θ′₂, ...;
3. fine-tune θ on each task with LoRA (PEFT) and with PMSS: patches Δ saved as PEFT adapter dirs;
4. port θ′ₖ + Δ with ``portllm.port`` (what `portllm port` runs);
5. evaluate θ, θ + Δ, θ′ₖ, θ′ₖ + Δ (ported) and θ′ₖ fine-tuned afresh on held-out prompts; compare
   what porting and re-fine-tuning cost (time, and peak memory measured in separate processes).

Writes results.json, table.md and accuracy.png to the output directory.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from portllm.experiment import data, plot, train
from portllm.memory import run_measured
from portllm.port import port

# releases: (continued-pretraining steps, corpus shift, learning rate), applied one after another.
FULL = dict(pretrain_steps=400, releases=[(30, 0.25, 2e-4), (100, 0.5, 5e-4), (300, 1.0, 1e-3)], ft_steps=200,
            corpus=30000)
QUICK = dict(pretrain_steps=250, releases=[(30, 0.25, 2e-4), (150, 1.0, 1e-3)], ft_steps=150, corpus=8000)


class Progress:
    """One status line, rewritten in place (a plain line per phase when not on a terminal)."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty = stream, stream.isatty()

    def __call__(self, desc, step, total, loss):
        if self.tty:
            self.stream.write(f"\r  {desc:<34} {step:>4}/{total} loss {loss:6.3f}")
            if step == total:
                self.stream.write("\n")
            self.stream.flush()
        elif step == total:
            self.stream.write(f"  {desc:<34} {total} steps, final loss {loss:.3f}\n")
            self.stream.flush()


def _save_model(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _relative_change(a, b) -> float:
    num = den = 0.0
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.dim() == 2:
            num += float((q.detach() - p.detach()).double().pow(2).sum())
            den += float(p.detach().double().pow(2).sum())
    return (num / den) ** 0.5


def _port(model_dir, patch_dir, out_dir) -> float:
    t0 = time.perf_counter()
    port(model_dir, patch_dir, out_dir, device="cpu", force=True, progress=False, log=None)
    return time.perf_counter() - t0


def _measure(job: list[str]) -> dict:
    """Runs a measurement job in its own process (its peak RSS is its own)."""
    return run_measured([sys.executable, "-m", "portllm.experiment.measure", *job], job[0])


def run(out: str, quick: bool = False, seed: int = 0, log=print) -> dict:
    """The experiment (see ``_run``), with the libraries quiet: the demo's log is one line per stage,
    and transformers' per-load progress bars ("Loading weights", "Writing model shards") and its
    deprecation notices for calls PEFT makes are noise there. Both are put back on return."""
    import warnings

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
            warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*",
                                    category=FutureWarning)
            return _run(out, quick, seed, log)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(out: str, quick: bool = False, seed: int = 0, log=print) -> dict:
    cfg = QUICK if quick else FULL
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "work")
    t_start = time.perf_counter()
    progress = Progress()
    tok = data.make_tokenizer()

    log(f"[1/5] pretraining θ ({cfg['pretrain_steps']} steps on {cfg['corpus']} synthetic sentences)")
    theta = train.build_model(seed)
    train.pretrain(theta, tok, data.corpus(cfg["corpus"], seed), cfg["pretrain_steps"], seed=seed,
                   progress=progress, desc="pretrain θ")
    _save_model(theta, tok, os.path.join(work, "theta"))

    log(f"[2/5] evolving θ: {len(cfg['releases'])} releases of continued pretraining on a shifted corpus")
    releases, cur, total_steps = [], theta, 0
    for k, (steps, shift, lr) in enumerate(cfg["releases"]):
        import copy

        cur = copy.deepcopy(cur)
        train.pretrain(cur, tok, data.corpus(cfg["corpus"], seed + 100 + k, shift=shift), steps, lr=lr,
                       seed=seed + k, progress=progress, desc=f"release θ′{k + 1} (+{steps} steps, shift {shift})")
        total_steps += steps
        path = os.path.join(work, f"evolved{k + 1}")
        _save_model(cur, tok, path)
        change = _relative_change(theta, cur)
        releases.append({"name": f"θ′{k + 1}", "path": path, "continued_steps": total_steps, "shift": shift,
                         "lr": lr, "relative_weight_change": change})
        log(f"  θ′{k + 1}: weights moved {change:.1%} from θ (relative Frobenius norm, all 2-D weights)")

    log(f"[3/5] fine-tuning θ on {len(data.TASKS)} tasks with LoRA (PEFT, r=8) and PMSS (r=16)")
    patches = {}
    for task in data.TASKS:
        lora = train.finetune_lora(theta, tok, task, cfg["ft_steps"], seed=seed, progress=progress,
                                   desc=f"LoRA on θ: {task}")
        lp = os.path.join(work, f"patch-lora-{task}")
        lora.save_pretrained(lp)
        from portllm import pmss

        pm = train.finetune_pmss(theta, tok, task, cfg["ft_steps"], seed=seed, progress=progress,
                                 desc=f"PMSS on θ: {task}")
        pp = os.path.join(work, f"patch-pmss-{task}")
        pmss.to_patch(pm).save(pp, overwrite=True)
        patches[task] = {"lora": (lp, lora.merge_and_unload()), "pmss": (pp, pmss.merge(pm))}

    log("[4/5] porting every patch onto every release with portllm.port; [5/5] evaluating")
    results = {"tasks": {}, "releases": [{k: v for k, v in r.items() if k != "path"} for r in releases]}
    port_seconds = []
    for task in data.TASKS:
        row = {"theta": train.accuracy_batched(theta, tok, task),
               "theta+lora": train.accuracy_batched(patches[task]["lora"][1], tok, task),
               "theta+pmss": train.accuracy_batched(patches[task]["pmss"][1], tok, task), "releases": []}
        for k, rel in enumerate(releases):
            evolved = _load(rel["path"])
            entry = {"evolved": train.accuracy_batched(evolved, tok, task)}
            for method in ("lora", "pmss"):
                ported_dir = os.path.join(work, f"ported-{method}-{task}-{k + 1}")
                port_seconds.append(_port(rel["path"], patches[task][method][0], ported_dir))
                entry[f"ported_{method}"] = train.accuracy_batched(_load(ported_dir), tok, task)
            t0 = time.perf_counter()
            refit = train.finetune_lora(evolved, tok, task, cfg["ft_steps"], seed=seed, progress=progress,
                                        desc=f"LoRA afresh on θ′{k + 1}: {task}")
            entry["refit_seconds"] = time.perf_counter() - t0
            entry["refit"] = train.accuracy_batched(refit, tok, task)
            row["releases"].append(entry)
        results["tasks"][task] = row

    results["check"] = _check_validation(os.path.join(work, "theta"), releases, patches, tok, results, seed, log)
    results["check"]["port_seconds_median"] = sorted(port_seconds)[len(port_seconds) // 2]
    results["fp8"] = _fp8_release(releases[0], patches, tok, work, seed, log)
    results["nvfp4"] = _nvfp4_release(releases[0], patches, tok, work, seed, log)

    log("measuring the cost of porting and of re-fine-tuning (peak memory in separate processes)")
    rel1, task0 = releases[0]["path"], data.TASKS[0]
    results["cost"] = {
        "port": _measure(["port", rel1, patches[task0]["lora"][0], os.path.join(work, "measure-port")]),
        "refit": _measure(["finetune", rel1, task0, str(cfg["ft_steps"]), str(seed)]),
        "port_seconds_median": sorted(port_seconds)[len(port_seconds) // 2],
    }
    results["gap_closed"] = gap_closed(results)
    results["settings"] = {"quick": quick, "seed": seed, **{k: v for k, v in cfg.items()}}
    results["seconds"] = time.perf_counter() - t_start
    write_outputs(results, out)
    return results


CHECK_PROMPTS = 64


def _spearman(x: list[float], y: list[float]) -> float | None:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else None


def _evolved_acc(results: dict, p: dict) -> float:
    k = int(p["release"].removeprefix("θ′")) - 1
    return results["tasks"][p["task"]]["releases"][k]["evolved"]


def _check_validation(theta_dir: str, releases: list, patches: dict, tok, results: dict, seed: int, log) -> dict:
    """``portllm check`` on every (task, release, patch) point, from 64 unlabeled prompts of the task, against
    what was measured: retention R = (acc(θ′+Δ) − acc(θ′)) / (acc(θ+Δ) − acc(θ)) where the patch gains at
    least 0.1 on θ, and harm where acc(θ′+Δ) < acc(θ′). The check scores θ+Δ's greedy answers of 8 tokens
    (its default) and of 1 token (these tasks' answer)."""
    from portllm.check import check_portability

    log(f"[5/5] (check) the portability check on every point, from {CHECK_PROMPTS} unlabeled prompts per task")
    points = []
    for task in data.TASKS:
        prompts = [p for p, _ in data.task_examples(task, CHECK_PROMPTS, seed + 4242)]
        row = results["tasks"][task]
        for k, rel in enumerate(releases):
            e = row["releases"][k]
            for method in ("lora", "pmss"):
                pt = {"task": task, "release": rel["name"], "patch": method}
                for tokens in (8, 1):
                    rep = check_portability(theta_dir, rel["path"], patches[task][method][0], prompts, tokenizer=tok,
                                            max_new_tokens=tokens, calibrate=tokens == 1)
                    pt[f"score_{tokens}"], pt[f"harm_{tokens}"] = rep.score, rep.harm
                    pt[f"seconds_{tokens}"] = rep.seconds
                gain = row[f"theta+{method}"] - row["theta"]
                pt["retention"] = (e[f"ported_{method}"] - e["evolved"]) / gain if gain >= 0.1 else None
                pt["harmful"] = e[f"ported_{method}"] < e["evolved"]
                # calibrated (1-token check): ported at the chosen scale
                d = os.path.join(os.path.dirname(theta_dir), f"calibrated-{method}-{task}-{k + 1}")
                port(rel["path"], patches[task][method][0], d, scale=rep.scale, device="cpu", force=True,
                     progress=False, log=None)
                pt["scale"] = rep.scale
                pt["calibrated"] = train.accuracy_batched(_load(d), tok, task)
                pt["retention_calibrated"] = (pt["calibrated"] - e["evolved"]) / gain if gain >= 0.1 else None
                points.append(pt)
    out = {"prompts": CHECK_PROMPTS, "points": points}
    harmful = [p for p in points if p["harmful"]]
    fine = [p for p in points if not p["harmful"] and p["retention"] is not None]
    out["calibration"] = {
        "harmful": len(harmful), "fixed": sum(p["calibrated"] >= _evolved_acc(results, p) for p in harmful),
        "others": len(fine),
        "others_retention": sum(p["retention"] for p in fine) / len(fine) if fine else None,
        "others_retention_calibrated": sum(p["retention_calibrated"] for p in fine) / len(fine) if fine else None}
    for tokens in (8, 1):
        both = [p for p in points if p["retention"] is not None and p[f"score_{tokens}"] is not None]
        tp = sum(p["harmful"] and p[f"harm_{tokens}"] for p in points)
        pred, actual = sum(p[f"harm_{tokens}"] for p in points), sum(p["harmful"] for p in points)
        out[f"tokens_{tokens}"] = {
            "spearman": _spearman([p[f"score_{tokens}"] for p in both], [p["retention"] for p in both]),
            "points": len(both), "harm_predicted": pred, "harmful": actual, "harm_caught": tp,
            "precision": tp / pred if pred else None, "recall": tp / actual if actual else None,
            "seconds_median": sorted(p[f"seconds_{tokens}"] for p in points)[len(points) // 2]}
    return out


def _fp8_release(rel: dict, patches: dict, tok, work: str, seed: int, log) -> dict:
    """θ′1 also shipped as a block-FP8 checkpoint (``fp8_release``): each task's LoRA patch ported onto
    it with each rounding, the accuracies read back dequantized, and the fraction of the patch that
    survived requantization, as the port reported it."""
    from portllm import fp8
    from portllm.experiment import fp8_release

    log(f"[4/5] (FP8) {rel['name']} also released as block-FP8 ({fp8_release.BLOCK[0]}x{fp8_release.BLOCK[1]} blocks): "
        "porting each LoRA patch onto it with each rounding")
    fp8_dir = os.path.join(work, "evolved1-fp8")
    fp8_release.save_fp8(rel["path"], fp8_dir)
    alone = fp8_release.load_dequantized(fp8_dir)
    out = {"release": rel["name"], "block": list(fp8_release.BLOCK), "tasks": {}}
    for task in data.TASKS:
        e = {"evolved_fp8": train.accuracy_batched(alone, tok, task)}
        for rounding in fp8.ROUNDINGS:
            d = os.path.join(work, f"ported-lora-{task}-1-fp8-{rounding}")
            port(fp8_dir, patches[task]["lora"][0], d, device="cpu", force=True, progress=False, log=None,
                 rounding=rounding, seed=seed)
            e[f"ported_{rounding}"] = train.accuracy_batched(fp8_release.load_dequantized(d), tok, task)
            e[f"retained_{rounding}"] = fp8_release.retained(d)
        out["tasks"][task] = e
    return out


def _nvfp4_release(rel: dict, patches: dict, tok, work: str, seed: int, log) -> dict:
    """θ′1 also shipped as an NVFP4 checkpoint (``fp4_release``): each task's LoRA patch ported onto it
    with each rounding (scales kept, the default; low retention allowed, to show it), the accuracies
    read back dequantized, and the fraction of the patch that survived, as the port reported it."""
    from portllm.experiment import fp4_release

    log(f"[4/5] (NVFP4) {rel['name']} also released as NVFP4 (e2m1, an e4m3 scale per 16): porting each LoRA "
        "patch onto it with each rounding")
    nv_dir = os.path.join(work, "evolved1-nvfp4")
    fp4_release.save_nvfp4(rel["path"], nv_dir)
    alone = fp4_release.load_dequantized(nv_dir)
    out = {"release": rel["name"], "tasks": {}}
    for task in data.TASKS:
        e = {"evolved_nvfp4": train.accuracy_batched(alone, tok, task)}
        for rounding in ("nearest", "stochastic"):
            d = os.path.join(work, f"ported-lora-{task}-1-nvfp4-{rounding}")
            port(nv_dir, patches[task]["lora"][0], d, device="cpu", force=True, progress=False, log=None,
                 rounding=rounding, seed=seed, allow_low_retention=True)
            e[f"ported_{rounding}"] = train.accuracy_batched(fp4_release.load_dequantized(d), tok, task)
            e[f"retained_{rounding}"] = fp4_release.retained(d)
            e["refreshed"] = list(fp4_release.refreshed(d))
        out["tasks"][task] = e
    return out


def gap_closed(results) -> dict:
    """Per release: mean over tasks of (ported − θ′) / (θ′ re-fine-tuned − θ′), over tasks where
    re-fine-tuning gains at least 5 points over θ′ (elsewhere there is no gap to close)."""
    out = {}
    for k in range(len(results["releases"])):
        for method in ("lora", "pmss"):
            fracs = []
            for row in results["tasks"].values():
                e = row["releases"][k]
                gap = e["refit"] - e["evolved"]
                if gap >= 0.05:
                    fracs.append((e[f"ported_{method}"] - e["evolved"]) / gap)
            out.setdefault(method, []).append(sum(fracs) / len(fracs) if fracs else None)
    return out


def table(results) -> str:
    rels = results["releases"]
    head = "| task | θ | θ+Δ LoRA | θ+Δ PMSS | " + " | ".join(
        f"{r['name']} | {r['name']}+Δ LoRA (port) | {r['name']}+Δ PMSS (port) | {r['name']} re-fine-tuned"
        for r in rels) + " |"
    sep = "|---" * (4 + 4 * len(rels)) + "|"
    lines = [head, sep]
    for task, row in results["tasks"].items():
        cells = [task, f"{row['theta']:.2f}", f"{row['theta+lora']:.2f}", f"{row['theta+pmss']:.2f}"]
        for e in row["releases"]:
            cells += [f"{e['evolved']:.2f}", f"{e['ported_lora']:.2f}", f"{e['ported_pmss']:.2f}", f"{e['refit']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    g = results["gap_closed"]
    fmt = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    lines += ["", "Gap between θ′ and θ′ re-fine-tuned closed by the port (mean over tasks with a gap): " + "; ".join(
        f"{r['name']} ({r['continued_steps']} steps): LoRA {fmt(g['lora'][k])}, PMSS {fmt(g['pmss'][k])}"
        for k, r in enumerate(rels))]
    ck = results.get("check")
    if ck:
        fmt2 = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        lines += ["", f"The portability check (`portllm check`, before porting, from {ck['prompts']} unlabeled prompts "
                  "per task) against what was measured (retention where the patch gains at least 0.1 on θ; harmful: "
                  "θ′+Δ below θ′):", "",
                  "| task | release | patch | measured retention | harmful | check score (8 tokens) | predicted harm "
                  "(8) | check score (1 token) | predicted harm (1) | calibrated scale | retention, calibrated |",
                  "|---" * 11 + "|"]
        yn = lambda b: "yes" if b else "no"  # noqa: E731
        for p in ck["points"]:
            lines.append(f"| {p['task']} | {p['release']} | {p['patch']} | {fmt2(p['retention'])} | {yn(p['harmful'])} | "
                         f"{fmt2(p['score_8'])} | {yn(p['harm_8'])} | {fmt2(p['score_1'])} | {yn(p['harm_1'])} | "
                         f"{p['scale']:g} | {fmt2(p['retention_calibrated'])} |")
        lines.append("")
        for tokens in (8, 1):
            t = ck[f"tokens_{tokens}"]
            lines.append(f"Check scoring {tokens} token(s): Spearman ρ with measured retention {fmt2(t['spearman'])} over "
                         f"{t['points']} points; harm predicted {t['harm_predicted']}, harmful {t['harmful']}, caught "
                         f"{t['harm_caught']} (precision {fmt2(t['precision'])}, recall {fmt2(t['recall'])}); median "
                         f"{t['seconds_median']:.2f} s a check against {ck['port_seconds_median']:.2f} s a port.")
        cal = ck["calibration"]
        lines.append(f"Calibration (1-token check, `--calibrate`): {cal['fixed']} of {cal['harmful']} harmful ports no "
                     f"longer harmful; the other {cal['others']} ports' mean retention {fmt2(cal['others_retention'])} at "
                     f"scale 1, {fmt2(cal['others_retention_calibrated'])} calibrated.")
    f8 = results.get("fp8")
    if f8:
        name = f8["release"]
        lines += ["", f"{name} also released in block-FP8 ({f8['block'][0]}x{f8['block'][1]} blocks), the LoRA patch "
                  "ported onto it (accuracy; the fraction of the patch that survived requantization, as the port "
                  "reported it):", "",
                  f"| task | {name} | {name}+Δ LoRA (port) | {name} FP8 | {name} FP8+Δ LoRA, nearest | "
                  f"{name} FP8+Δ LoRA, stochastic | retained, nearest | retained, stochastic |",
                  "|---" * 8 + "|"]
        for task, e in f8["tasks"].items():
            r = results["tasks"][task]["releases"][0]
            lines.append(f"| {task} | {r['evolved']:.2f} | {r['ported_lora']:.2f} | {e['evolved_fp8']:.2f} | "
                         f"{e['ported_nearest']:.2f} | {e['ported_stochastic']:.2f} | {e['retained_nearest']:.3f} | "
                         f"{e['retained_stochastic']:.3f} |")
        lines.append("")
    nv = results.get("nvfp4")
    if nv:
        name = nv["release"]
        lines += [f"{name} also released in NVFP4 (e2m1 codes, an e4m3 scale per 16, a global scale), the LoRA patch "
                  "ported onto it with the default scale policy, reuse (accuracy; the fraction of the patch that "
                  "survived, as the port reported it; the weights the patch outgrew, whose global scale could not "
                  "hold the merged weight, requantized fresh):", "",
                  f"| task | {name} | {name}+Δ LoRA (port) | {name} NVFP4 | {name} NVFP4+Δ LoRA, nearest | "
                  f"{name} NVFP4+Δ LoRA, stochastic | retained, nearest | retained, stochastic | requantized fresh |",
                  "|---" * 9 + "|"]
        for task, e in nv["tasks"].items():
            r = results["tasks"][task]["releases"][0]
            lines.append(f"| {task} | {r['evolved']:.2f} | {r['ported_lora']:.2f} | {e['evolved_nvfp4']:.2f} | "
                         f"{e['ported_nearest']:.2f} | {e['ported_stochastic']:.2f} | {e['retained_nearest']:.3f} | "
                         f"{e['retained_stochastic']:.3f} | {e['refreshed'][0]} of {e['refreshed'][1]} |")
        lines.append("")
    c = results["cost"]
    lines += [f"Cost on {rels[0]['name']}: port {c['port']['seconds']:.2f} s, peak memory "
              f"{c['port']['peak_rss_above_baseline'] / 2**20:.1f} MiB; re-fine-tuning {c['refit']['seconds']:.2f} s, "
              f"peak memory {c['refit']['peak_rss_above_baseline'] / 2**20:.1f} MiB "
              f"(ratio {c['refit']['peak_rss_above_baseline'] / max(1, c['port']['peak_rss_above_baseline']):.0f}×)."]
    return "\n".join(lines) + "\n"


def write_outputs(results, out):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table(results))
    plot.release_curves(results, os.path.join(out, "accuracy.png"))
