"""The portability experiment (PortLLM, arXiv 2410.10870) end to end, at a CPU-sized scale, over seeds:
each seed (``seed_run``, a process of its own) pretrains a small Llama θ, evolves it into successive
releases θ′₁ … θ′₅, fine-tunes θ on three tasks with LoRA (PEFT) and PMSS (learning rates chosen on a
val split), ports every patch onto every release with ``portllm.port``, re-fine-tunes every release
the same way, evaluates everything on a test split no choice was made on, and runs the portability
check on every point. Seeds run side by side, one thread each. Then, on seed 0: θ′₁ released in
block-FP8 and in NVFP4 with the LoRA patches ported onto it, and the cost of a port against a
re-fine-tune (time, and peak memory measured in separate processes). ``aggregate`` makes the figures
(mean ± spread over seeds, retention, harmful cells, the check's validation); ``report`` the tables.

Writes results.json, table.md and accuracy.png to the output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from portllm.experiment import aggregate, data, plot, report, seed_run, train
from portllm.memory import run_measured
from portllm.port import port

SEEDS = 5


def _measure(job: list[str]) -> dict:
    """Runs a measurement job in its own process (its peak RSS is its own)."""
    return run_measured([sys.executable, "-m", "portllm.experiment.measure", *job], job[0])


def _seed_env() -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = "1"
    return env


def run_seeds(work: str, seeds: list[int], quick: bool, log=print, parallel: int | None = None) -> list[dict]:
    """One ``seed_run`` process per seed, ``parallel`` at a time (default: all of them, up to 4 per core:
    each is single-threaded, so the cores are shared without threads waiting on each other, and the run
    takes the seeds' total CPU time over the cores, not whole rounds of seeds), their lines passed on as
    they come; the results in seed order. A seed that fails stops the run with its last lines."""
    parallel = parallel or max(1, min(len(seeds), 4 * (os.cpu_count() or 1)))
    pending, running, tails, procs = list(seeds), {}, {}, []
    import selectors

    sel = selectors.DefaultSelector()
    try:
        while pending or running:
            while pending and len(running) < parallel:
                s = pending.pop(0)
                d = os.path.join(work, f"seed-{s}")
                proc = subprocess.Popen([sys.executable, "-m", "portllm.experiment.seed_run", d, str(s),
                                         "quick" if quick else "full"], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=_seed_env())
                procs.append(proc)
                running[proc.stdout] = (s, proc)
                tails[s] = []
                sel.register(proc.stdout, selectors.EVENT_READ)
            for key, _ in sel.select():
                s, proc = running[key.fileobj]
                line = key.fileobj.readline()
                if line:
                    tails[s] = (tails[s] + [line.rstrip()])[-20:]
                    if line.startswith("  [seed"):
                        log(line.rstrip())
                    continue
                sel.unregister(key.fileobj)
                del running[key.fileobj]
                if proc.wait() != 0:
                    raise RuntimeError(f"seed {s} failed:\n" + "\n".join(tails[s]))
    finally:  # a failed seed, an error here or Ctrl-C: no seed process outlives the run, no pipe stays open
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()
        sel.close()
    out = []
    for s in seeds:
        path = os.path.join(work, f"seed-{s}", "seed.json")
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError) as e:
            raise RuntimeError(f"seed {s} ended without its results ({path}: {e}); its last lines:\n"
                               + "\n".join(tails.get(s, []))) from None
    return out


def run(out: str, quick: bool = False, seed: int = 0, seeds: int | None = None, log=print) -> dict:
    """The experiment (module docstring) with seeds ``seed``, ``seed`` + 1, … (``seeds`` of them; default
    5, or 2 with ``quick``), the libraries quiet: transformers' per-load progress bars and its
    deprecation notices for calls PEFT makes are noise in the demo's log. Both are put back on return."""
    import warnings

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
            warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*",
                                    category=FutureWarning)
            return _run(out, quick, seed, seeds, log)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(out: str, quick: bool, seed: int, seeds: int | None, log) -> dict:
    import torch

    cfg = seed_run.QUICK if quick else seed_run.FULL
    n = seeds or (2 if quick else SEEDS)
    if n < 1:
        raise ValueError(f"--seeds must be at least 1, got {n}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "work")
    t_start = time.perf_counter()
    log(f"{n} seeds ({seed}..{seed + n - 1}), each: pretrain θ ({cfg['pretrain_steps']} steps), "
        f"{len(cfg['releases'])} releases, LoRA (r=8) and PMSS (r=16) on {len(data.TASKS)} tasks with the lr "
        f"chosen on val from {len(cfg['lrs']['lora'])}, every patch ported onto every release, every release "
        "re-fine-tuned the same way, the portability check on every point")
    per_seed = run_seeds(work, list(range(seed, seed + n)), quick, log)
    results = aggregate.summarize(per_seed)
    first = per_seed[0]
    tok = data.make_tokenizer()
    results["fp8"] = _fp8_release(first, tok, os.path.join(work, f"seed-{seed}"), seed, log)
    results["nvfp4"] = _nvfp4_release(first, tok, os.path.join(work, f"seed-{seed}"), seed, log)

    log("measuring the cost of porting and of re-fine-tuning (peak memory in separate processes)")
    rel1, task0 = first["releases"][0]["path"], data.TASKS[0]
    results["cost"] = {
        "port": _measure(["port", rel1, first["patches"][task0]["lora"], os.path.join(work, "measure-port")]),
        "refit": _measure(["finetune", rel1, task0, str(cfg["ft_steps"]), str(seed)]),
        "check": _measure(["check", first["theta_dir"], rel1, first["patches"][task0]["lora"], task0, str(seed)]),
        "port_seconds_median": results["check"]["port_seconds_median"],
    }
    results["per_seed"] = per_seed
    results["settings"] = {"quick": quick, "seeds": results["seeds"], **cfg,
                           "lrs": {k: list(v) for k, v in cfg["lrs"].items()}, "check_prompts": seed_run.CHECK_PROMPTS,
                           "seed_seconds": [s["seconds"] for s in per_seed]}
    results["seconds"] = time.perf_counter() - t_start
    write_outputs(results, out)
    return results


def _fp8_release(first: dict, tok, work: str, seed: int, log) -> dict:
    """θ′1 also shipped as a block-FP8 checkpoint (``fp8_release``): each task's LoRA patch ported onto
    it with each rounding, the accuracies read back dequantized, and the fraction of the patch that
    survived requantization, as the port reported it."""
    from portllm import fp8
    from portllm.experiment import fp8_release

    rel, patches = first["releases"][0], first["patches"]
    log(f"[4/5] (FP8) {rel['name']} also released as block-FP8 ({fp8_release.BLOCK[0]}x{fp8_release.BLOCK[1]} blocks): "
        "porting each LoRA patch onto it with each rounding")
    fp8_dir = os.path.join(work, "evolved1-fp8")
    fp8_release.save_fp8(rel["path"], fp8_dir)
    alone = fp8_release.load_dequantized(fp8_dir)
    out = {"release": rel["name"], "seed": seed, "block": list(fp8_release.BLOCK), "tasks": {}}
    for task in data.TASKS:
        r = first["tasks"][task]["releases"][0]
        e = {"evolved": r["evolved"], "ported_lora": r["ported_lora"],
             "evolved_fp8": train.accuracy_batched(alone, tok, task)}
        for rounding in fp8.ROUNDINGS:
            d = os.path.join(work, f"ported-lora-{task}-1-fp8-{rounding}")
            port(fp8_dir, patches[task]["lora"], d, device="cpu", force=True, progress=False, log=None,
                 rounding=rounding, seed=seed)
            e[f"ported_{rounding}"] = train.accuracy_batched(fp8_release.load_dequantized(d), tok, task)
            e[f"retained_{rounding}"] = fp8_release.retained(d)
        out["tasks"][task] = e
    return out


def _nvfp4_release(first: dict, tok, work: str, seed: int, log) -> dict:
    """θ′1 also shipped as an NVFP4 checkpoint (``fp4_release``): each task's LoRA patch ported onto it
    with each rounding (scales kept, the default; low retention allowed, to show it), the accuracies
    read back dequantized, and the fraction of the patch that survived, as the port reported it."""
    from portllm.experiment import fp4_release

    rel, patches = first["releases"][0], first["patches"]
    log(f"[4/5] (NVFP4) {rel['name']} also released as NVFP4 (e2m1, an e4m3 scale per 16): porting each LoRA "
        "patch onto it with each rounding")
    nv_dir = os.path.join(work, "evolved1-nvfp4")
    fp4_release.save_nvfp4(rel["path"], nv_dir)
    alone = fp4_release.load_dequantized(nv_dir)
    out = {"release": rel["name"], "seed": seed, "tasks": {}}
    for task in data.TASKS:
        r = first["tasks"][task]["releases"][0]
        e = {"evolved": r["evolved"], "ported_lora": r["ported_lora"],
             "evolved_nvfp4": train.accuracy_batched(alone, tok, task)}
        for rounding in ("nearest", "stochastic"):
            d = os.path.join(work, f"ported-lora-{task}-1-nvfp4-{rounding}")
            port(nv_dir, patches[task]["lora"], d, device="cpu", force=True, progress=False, log=None,
                 rounding=rounding, seed=seed, allow_low_retention=True)
            e[f"ported_{rounding}"] = train.accuracy_batched(fp4_release.load_dequantized(d), tok, task)
            e[f"retained_{rounding}"] = fp4_release.retained(d)
            e["refreshed"] = list(fp4_release.refreshed(d))
        out["tasks"][task] = e
    return out


def write_outputs(results, out):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report.table(results))
    plot.release_curves(results, os.path.join(out, "accuracy.png"))
