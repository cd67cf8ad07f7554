"""Runs the benchmark suites (pytest-benchmark) and writes benchmarks/results/<device>.json.

Usage: python benchmarks/run.py [--quick] [--out DIR] [pytest args...]

The JSON holds, per case and provider: median time, bytes moved and GB/s, fraction of the copy
bandwidth measured in the same run, speed relative to torch.addmm_ in the same run, and extra peak
memory; with the device, versions, commit and command that produced it, and the issue's targets
evaluated on these numbers. --quick runs tiny shapes for a smoke test and writes nowhere unless
--out is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_description(device: str) -> dict:
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}"}
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"type": "cpu", "name": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def slug(desc: dict) -> str:
    name = desc["name"] + (f" {desc['cores']}c" if desc["type"] == "cpu" else "")
    return re.sub(r"[^a-z0-9]+", "-", f"{desc['type']} {name}".lower()).strip("-")


def versions() -> dict:
    import torch

    import portllm

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "portllm": portllm.__version__, "portllm_build": portllm._ext.build_info()}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def summarise(raw: dict) -> list[dict]:
    rows = []
    for b in raw["benchmarks"]:
        info = dict(b["extra_info"])
        if info["op"] == "port":  # one timed round; the job's own time, without process start-up
            info.update(median_ms=round(info["seconds"] * 1e3, 1))
            if info["case"] == "checkpoint":
                info["gbps"] = round(info["checkpoint_bytes"] / info["seconds"] / 1e9, 3)
            rows.append(info)
            continue
        median = b["stats"]["median"] if info.get("provider") != "fma-floor" else info["floor_seconds"]
        info.update(median_ms=round(median * 1e3, 4), min_ms=round(b["stats"]["min"] * 1e3, 4),
                    rounds=b["stats"]["rounds"], gbps=round(info["bytes"] / median / 1e9, 2))
        rows.append(info)
    port_rows(rows)
    pmss_rows(rows)
    serve_rows(rows)
    train_rows(rows)
    rows = [r for r in rows if r["op"] == "patch_add_"] + [r for r in rows if r["op"] != "patch_add_"]
    pa = [r for r in rows if r["op"] == "patch_add_"]
    copy = {(r["m"], r["n"]): r for r in pa if r["provider"] == "copy"}
    inplace = {(r["m"], r["n"]): r for r in pa if r["provider"] == "in-place"}
    addmm = {(r["case"], r["m"], r["n"], r["r"]): r for r in pa if r["provider"].startswith("torch.addmm_")}
    for r in pa:
        c = copy.get((r["m"], r["n"]))
        if c is not None:
            r["fraction_of_copy_bandwidth"] = round(r["gbps"] / c["gbps"], 3)
        i = inplace.get((r["m"], r["n"]))
        if i is not None:
            r["fraction_of_inplace_bandwidth"] = round(r["gbps"] / i["gbps"], 3)
        a = addmm.get((r["case"], r["m"], r["n"], r["r"]))
        if a is not None:
            r["speedup_vs_addmm_"] = round(a["median_ms"] / r["median_ms"], 3)
    # CPU paths: the limit is the larger of an in-place pass over W and the FMA floor of that path.
    ref = {(r["case"], r["m"], r["n"], r["r"], r.get("factor_dtype")): r for r in pa
           if r["provider"] == "portllm-reference"}
    floor = {(r["m"], r["n"], r["r"], r["isa"]): r for r in pa if r["provider"] == "fma-floor"}
    for r in pa:
        f = ref.get((r["case"], r["m"], r["n"], r["r"], r.get("factor_dtype")))
        if f is not None and r["provider"].startswith("portllm-"):
            r["speedup_vs_reference"] = round(f["median_ms"] / r["median_ms"], 3)
        fl, i = floor.get((r["m"], r["n"], r["r"], r.get("isa"))), inplace.get((r["m"], r["n"]))
        if fl is not None and i is not None and r["provider"] == "portllm-cpp":
            limit = max(fl["median_ms"], i["median_ms"])
            r["limit_ms"] = round(limit, 3)
            r["time_vs_limit"] = round(r["median_ms"] / limit, 3)
    return rows


def port_rows(rows):
    """Port jobs: time relative to copying the files, and PEFT's time relative to each."""
    by = {r["provider"]: r for r in rows if r["op"] == "port"}
    copy, peft = by.get("copy files"), by.get("peft load+merge_and_unload+save")
    peft_mem = by.get("peft merge_and_unload (in memory)")
    for r in by.values():
        if r["case"] == "checkpoint" and copy:
            r["time_vs_copy"] = round(r["seconds"] / copy["seconds"], 3)
        if r["case"] == "checkpoint" and peft and r is not peft:
            r["speedup_vs_peft"] = round(peft["seconds"] / r["seconds"], 3)
        if r["case"] == "in_memory" and peft_mem and r is not peft_mem:
            r["speedup_vs_peft"] = round(peft_mem["seconds"] / r["seconds"], 3)


def pmss_rows(rows):
    """PMSS layer: time relative to PEFT's LoRA layer and to the dense-CUR layer, in the same run."""
    layer = {r["provider"]: r for r in rows if r["op"] == "pmss_layer"}
    lora, dense = layer.get("peft-lora-r8"), layer.get("dense-cur")
    for r in layer.values():
        r.pop("gbps", None)
        if lora and r is not lora and "time_vs_lora" not in r:  # (the suite pairs each provider with LoRA)
            r["time_vs_lora"] = round(r["median_ms"] / lora["median_ms"], 3)
        if dense and r is not dense:
            r["speedup_vs_dense_cur"] = round(dense["median_ms"] / r["median_ms"], 3)
    for r in rows:
        if r["op"] == "pmss_select":
            r.pop("gbps", None)


def serve_rows(rows):
    """Serving: a patched layer's time over the base GEMM's (same shape, T, eager or graph, same run);
    decoding tokens/s and its ratio to the base model's and to PEFT's; the exact undo against the merge."""
    base = {(r["n_in"], r["n_out"], r["T"], r["graph"]): r for r in rows
            if r["op"] == "serve_layer" and r["provider"] == "base"}
    for r in rows:
        if r["op"] == "serve_layer":
            r.pop("gbps", None)
            b = base.get((r["n_in"], r["n_out"], r["T"], r["graph"]))
            if b is not None and "time_vs_base" not in r:  # (the suite pairs each provider with the base)
                r["time_vs_base"] = round(r["median_ms"] / b["median_ms"], 3)
    dec = {r["provider"]: r for r in rows if r["op"] == "serve_decode"}
    for r in dec.values():
        r.pop("gbps", None)
        r["tokens_per_s"] = round(r["batch"] * r["new_tokens"] / (r["median_ms"] / 1e3), 1)
    for r in dec.values():
        if "base" in dec and r is not dec["base"]:
            r["vs_base"] = round(r["tokens_per_s"] / dec["base"]["tokens_per_s"], 3)
        if "peft adapter_names" in dec and r["provider"].startswith("portllm.serve"):
            r["vs_peft"] = round(r["tokens_per_s"] / dec["peft adapter_names"]["tokens_per_s"], 3)
    undo = {r["provider"]: r for r in rows if r["op"] == "exact_undo"}
    merge = undo.get("merge (patch_add_)")
    for r in undo.values():
        if merge is not None:
            r["time_vs_merge"] = round(r["median_ms"] / merge["median_ms"], 3)
    exact = undo.get("apply exact=True")
    if exact is not None and "remove exact" in undo:
        undo["remove exact"]["time_vs_exact_merge"] = round(undo["remove exact"]["median_ms"] / exact["median_ms"], 3)


def train_rows(rows):
    """Training steps: PMSS's tokens/s and peak memory relative to PEFT LoRA's, per model size."""
    lora = {r["model"]: r for r in rows if r["op"] == "train_step" and r["provider"] == "peft-lora-r8"}
    for r in rows:
        if r["op"] != "train_step":
            continue
        r.pop("gbps", None)
        base = lora.get(r["model"])
        if base is not None and r is not base:
            r["tokens_per_s_vs_lora"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            if r.get("peak_memory_bytes") and base.get("peak_memory_bytes"):
                r["memory_vs_lora"] = round(r["peak_memory_bytes"] / base["peak_memory_bytes"], 3)


def find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def targets(rows: list[dict], device: str) -> list[dict]:
    """The issues' targets (benchmarks/goals.py), evaluated on this run's numbers."""
    from goals import evaluate

    return evaluate(rows, device)


SUITE_OPS = {"patch_add": {"patch_add_"}, "port": {"port"}, "pmss": {"pmss_layer", "pmss_select"},
             "serve": {"serve_layer", "serve_decode", "exact_undo"}, "train": {"train_step"}}


def merge_with_previous(path: str, result: dict, suite: str) -> dict:
    """A run of one suite replaces that suite's rows in the device's results file and keeps the
    others, each suite with the commit, date and command that measured it (``suites``)."""
    run = {k: result[k] for k in ("commit", "date", "command", "pytest_command", "versions")}
    if suite == "all" or not os.path.exists(path):
        result["suites"] = {s: run for s in SUITE_OPS} if suite == "all" else {suite: run}
        return result
    with open(path) as f:
        old = json.load(f)
    mine = SUITE_OPS[suite]
    rows = [r for r in old["results"] if r["op"] not in mine] + [r for r in result["results"] if r["op"] in mine]
    suites = old.get("suites") or {s: {k: old.get(k) for k in ("commit", "date", "command", "pytest_command",
                                                                "versions")} for s in SUITE_OPS
                                   if any(r["op"] in SUITE_OPS[s] for r in old["results"])}
    suites[suite] = run
    merged = dict(result, results=rows, suites=suites, targets=targets(rows, result["device"]["type"]))
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run portllm's benchmarks and record the results.")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke test)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    ap.add_argument("--suite", choices=["all", "patch_add", "port", "pmss", "serve", "train"], default="all")
    a, pytest_args = ap.parse_known_args(argv)
    env = dict(os.environ)
    if a.quick:
        env["PORTLLM_BENCH_QUICK"] = "1"
    out_dir = a.out or (None if a.quick else os.path.join(HERE, "results"))

    import torch

    device = env.get("PORTLLM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.json")
        suites = {"patch_add": ["bench_patch_add.py"], "port": ["bench_port.py"], "pmss": ["bench_pmss.py"],
                  "serve": ["bench_serve.py"], "train": ["bench_train.py"],
                  "all": ["bench_patch_add.py", "bench_port.py", "bench_pmss.py", "bench_serve.py",
                          "bench_train.py"]}[a.suite]
        cmd = [sys.executable, "-m", "pytest", *[os.path.join(HERE, f) for f in suites], "-q",
               "-o", "python_files=bench_*.py", "-p", "no:cacheprovider",
               f"--benchmark-json={raw_path}", "--benchmark-columns=median,min,rounds", *pytest_args]
        print("+", " ".join(cmd), flush=True)
        res = subprocess.run(cmd, cwd=ROOT, env=env)
        if res.returncode != 0:
            return res.returncode
        with open(raw_path) as f:
            raw = json.load(f)

    rows = summarise(raw)
    desc = device_description(device)
    result = {
        "device": desc,
        "versions": versions(),
        "commit": git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ("make bench" if a.suite == "all" else f"python benchmarks/run.py --suite {a.suite}")
        + (" (quick)" if a.quick else ""),
        "pytest_command": " ".join(["python", "-m", "pytest"] + [os.path.relpath(c, ROOT) if c.startswith(HERE) else c
                                                                 for c in cmd[3:] if "json" not in c]),
        "results": rows,
        "targets": targets(rows, device),
    }
    if any(r["op"] == "patch_add_" for r in rows):
        print(f"\n{'case':<34} {'provider':<26} {'median ms':>10} {'GB/s':>8} {'x copy':>7} {'x in-pl':>7} "
              f"{'x addmm_':>8} {'extra MiB':>9}")
    for r in rows:
        if r["op"] != "patch_add_":
            continue
        case = f"{r['m']}x{r['n']} r={r['r']}" + (" (4 patches)" if r["case"] != "single" else "")
        extra = r.get("extra_peak_bytes")
        print(f"{case:<34} {r['provider']:<26} {r['median_ms']:>10.3f} {r['gbps']:>8.1f} "
              f"{r.get('fraction_of_copy_bandwidth', float('nan')):>7.2f} "
              f"{r.get('fraction_of_inplace_bandwidth', float('nan')):>7.2f} {r.get('speedup_vs_addmm_', float('nan')):>8.2f} "
              f"{(extra / 2**20 if extra is not None else float('nan')):>9.1f}")
    ports = [r for r in rows if r["op"] == "port"]
    if ports:
        print(f"\n{'port job':<40} {'seconds':>9} {'peak RSS MiB':>13} {'x copy':>7} {'PEFT / this':>11}")
        for r in ports:
            print(f"{r['provider']:<40} {r['seconds']:>9.2f} {r['peak_rss_above_baseline'] / 2**20:>13.1f} "
                  f"{r.get('time_vs_copy', float('nan')):>7.2f} {r.get('speedup_vs_peft', float('nan')):>11.2f}")
    layers = [r for r in rows if r["op"] == "pmss_layer"]
    if layers:
        print(f"\n{'PMSS layer fwd+bwd':<24} {'median ms':>10} {'trainable':>10} {'saved MiB':>10} {'x LoRA':>7} "
              f"{'dense/this':>10}")
        for r in layers:
            print(f"{r['provider']:<24} {r['median_ms']:>10.2f} {r['trainable_params']:>10} "
                  f"{r['saved_activation_bytes'] / 2**20:>10.2f} {r.get('time_vs_lora', float('nan')):>7.2f} "
                  f"{r.get('speedup_vs_dense_cur', float('nan')):>10.2f}")
    for r in rows:
        if r["op"] == "pmss_select":
            print(f"\nselect_skeleton ({r['provider']}, r={r['r']}), one 7B layer's 7 projections: "
                  f"{r['median_ms'] / 1e3:.2f} s")
    serve = [r for r in rows if r["op"] == "serve_layer"]
    if serve:
        print(f"\n{'serve layer (bf16, r=16)':<30} {'T':>5} {'case':<12} {'provider':<18} {'graph':>5} {'median ms':>10} "
              f"{'x base':>7}")
        for r in serve:
            print(f"{str(r['n_in']) + 'x' + str(r['n_out']):<30} {r['T']:>5} {r['case']:<12} {r['provider']:<18} "
                  f"{str(r['graph']):>5} {r['median_ms']:>10.3f} {r.get('time_vs_base', float('nan')):>7.2f}")
    for r in rows:
        if r["op"] == "serve_decode":
            print(f"decode {r['provider']:<22} {r['tokens_per_s']:>9.1f} tok/s  x base {r.get('vs_base', 1.0):.2f}  "
                  f"x peft {r.get('vs_peft', float('nan')):.2f}")
        if r["op"] == "exact_undo":
            print(f"exact undo {r['provider']:<22} {r['median_ms']:>9.2f} ms  x merge {r.get('time_vs_merge', 1.0):.2f}  "
                  f"{r['bits_per_weight']:.3f} bits/weight")
    for r in rows:
        if r["op"] == "train_step":
            mem = r.get("peak_memory_bytes")
            print(f"train step {r['model']:<5} {r['provider']:<14} {r['tokens_per_s']:>10.0f} tok/s  "
                  f"x LoRA {r.get('tokens_per_s_vs_lora', 1.0):.2f}  peak {mem / 2**30 if mem else float('nan'):.2f} GiB"
                  f"  x LoRA {r.get('memory_vs_lora', float('nan')):.2f}"
                  + (f"  inject {r['inject_seconds']:.1f} s" if "inject_seconds" in r else ""))
    print("\nTargets:")
    for t in result["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}] {t['target']}: {t['value']} (goal {t['goal']})")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, slug(desc) + ".json")
        result = merge_with_previous(path, result, a.suite)
        tmp_path = path + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp_path, path)  # never a half-written results file
        print(f"\nwrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
