"""Runs the benchmark suites (pytest-benchmark) and writes benchmarks/results/<device>.json.

Usage: python benchmarks/run.py [--quick] [--suite NAME] [--out DIR] [pytest args...]

The suites are the ``bench_*.py`` files, each declaring its ``SUITE`` (``benchmarks/suite.py``).

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

from suite import discover  # noqa: E402


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


def _gen_defaults():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_defaults", os.path.join(ROOT, "tools", "gen_defaults.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def summarise(raw: dict, suites: dict) -> list[dict]:
    """The rows of a pytest-benchmark run, with each suite's derived figures (its ``rows``)."""
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
    stamp = _gen_defaults().stamp
    for row in rows:  # the source each row timed (tools/gen_defaults.py counts only rows of the current source)
        stamp(row)
    order = {op: k for k, s in enumerate(suites.values()) for op in sorted(s.ops)}
    rows.sort(key=lambda r: order.get(r["op"], len(order)))  # (stable: a suite's rows keep their order)
    for suite in suites.values():
        suite.rows(rows)
    return rows


def find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def targets(rows: list[dict], device: str) -> list[dict]:
    """The issues' targets (benchmarks/goals.py), evaluated on this run's numbers."""
    from goals import evaluate

    return evaluate(rows, device)


def merge_with_previous(path: str, result: dict, suite: str, declared: dict) -> dict:
    """A run of one suite replaces that suite's rows in the device's results file and keeps the
    others, each suite with the commit, date and command that measured it (``suites``)."""
    SUITE_OPS = {name: s.ops for name, s in declared.items()}
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
    suites = discover()
    ap.add_argument("--suite", choices=["all", *suites], default="all")
    a, pytest_args = ap.parse_known_args(argv)
    env = dict(os.environ)
    if a.quick:
        env["PORTLLM_BENCH_QUICK"] = "1"
    out_dir = a.out or (None if a.quick else os.path.join(HERE, "results"))

    import torch

    device = env.get("PORTLLM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.json")
        files = [s.file for s in suites.values()] if a.suite == "all" else [suites[a.suite].file]
        cmd = [sys.executable, "-m", "pytest", *[os.path.join(HERE, f) for f in files], "-q",
               "-o", "python_files=bench_*.py", "-p", "no:cacheprovider",
               f"--benchmark-json={raw_path}", "--benchmark-columns=median,min,rounds", *pytest_args]
        print("+", " ".join(cmd), flush=True)
        res = subprocess.run(cmd, cwd=ROOT, env=env)
        if res.returncode != 0:
            return res.returncode
        with open(raw_path) as f:
            raw = json.load(f)

    rows = summarise(raw, suites)
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
    for suite in suites.values():
        lines = suite.table(rows)
        if lines:
            print("\n" + "\n".join(lines))
    print("\nTargets:")
    for t in result["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}] {t['target']}: {t['value']} (goal {t['goal']})")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, slug(desc) + ".json")
        result = merge_with_previous(path, result, a.suite, suites)
        tmp_path = path + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp_path, path)  # never a half-written results file
        print(f"\nwrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
