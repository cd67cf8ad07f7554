"""`make gpu-check`: everything a lent GPU is for, as one prepared command (offline, within a budget).

A GPU is lent for minutes at a time, machine start-up included, so its work is one command run early:

1. the build (``make install``: on the GPU machine it reuses the installed torch, triton, transformers);
2. the tests that have CUDA cases (every backend against the reference on the GPU);
3. the benchmark suites the GPU decides (``benchmarks/run.py --suite ...``: patch_add, pmss, fp8, serve),
   each writing its rows into ``benchmarks/results/<device>.json`` as it finishes;
4. the defaults regenerated from those results (``tools/gen_defaults.py``).

Each step runs under what is left of the budget (``--budget``, default 480 s), and a step that would
start with too little left is skipped and said so, so the command ends in time and whatever finished
is on disk. ``benchmarks/results/gpu-check.json`` records each step: its command, status, seconds.
Afterwards: commit the results JSON, ``portllm/_defaults_table.py`` and ``gpu-check.json``.

``--dry-run`` (any machine): prints the steps and checks that everything they name exists (test
files, suites, tools), running nothing; ``tests/test_gpu_check.py`` runs it.

Usage: python tools/gpu_check.py [--dry-run] [--budget SECONDS] [--python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Test files with CUDA cases (each also runs its CPU cases: they are quick on the GPU machine's cores).
CUDA_TESTS = ["tests/test_patch_add.py", "tests/test_patch_add_registration.py", "tests/test_patch_add_experts.py",
              "tests/test_serve_ops.py", "tests/test_pmss_ops.py", "tests/test_fp8_triton.py",
              "tests/test_exact_undo.py", "tests/test_serve.py"]
SUITES = ["patch_add", "pmss", "fp8", "serve"]  # in the order they matter (the defaults first)
MIN_START = 30  # seconds: a step that would start with less left is skipped


def steps(py: str) -> list[tuple[str, list[str], int]]:
    """(name, command, cap in seconds) in order."""
    out = [("build", ["make", "install", f"PYTHON={py}"], 240),
           ("cuda tests", [os.path.join(".venv", "bin", "python"), "-m", "pytest", "-q", "-rfEs", "-p",
                           "no:cacheprovider", *CUDA_TESTS], 120)]
    for s in SUITES:
        out.append((f"bench {s}", [os.path.join(".venv", "bin", "python"), "benchmarks/run.py", "--suite", s], 150))
    out.append(("defaults", [os.path.join(".venv", "bin", "python"), "tools/gen_defaults.py"], 30))
    return out


def _suites() -> set[str]:
    """The suite names the benchmark files declare (``SUITE = Suite("name", ...)``), read as text: the
    dry run needs no torch."""
    import glob
    import re

    names = set()
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")):
        with open(path) as f:
            names |= set(re.findall(r'^SUITE = Suite\("([a-z_0-9]+)"', f.read(), re.M))
    return names


def dry_run(py: str) -> int:
    missing = [f for f in CUDA_TESTS if not os.path.isfile(os.path.join(ROOT, f))]
    known = _suites()
    missing += [f"suite {s}" for s in SUITES if s not in known]
    missing += [f for f in ("benchmarks/run.py", "tools/gen_defaults.py", "Makefile")
                if not os.path.isfile(os.path.join(ROOT, f))]
    total = 0
    for name, cmd, cap in steps(py):
        total += cap
        print(f"gpu-check step {name!r} (at most {cap} s): {' '.join(cmd)}")
    print(f"gpu-check: {len(steps(py))} steps, caps adding to {total} s, budget {_args.budget} s")
    if missing:
        print("gpu-check: missing: " + ", ".join(missing), file=sys.stderr)
        return 1
    print("gpu-check: dry run ok (nothing run)")
    return 0


def main(argv=None) -> int:
    global _args
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the steps and check what they name; run nothing")
    ap.add_argument("--budget", type=int, default=480, help="seconds for the whole command (default 480)")
    ap.add_argument("--python", default=os.environ.get("PYTHON", "python3"), help="the interpreter make builds with")
    _args = ap.parse_args(argv)
    if _args.dry_run:
        return dry_run(_args.python)
    os.chdir(ROOT)
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        print("gpu-check: no CUDA device here (run it on the lent GPU machine; --dry-run checks the plumbing)",
              file=sys.stderr)
        return 2
    t_end = time.monotonic() + _args.budget
    record, failed = [], False
    for name, cmd, cap in steps(_args.python):
        left = t_end - time.monotonic()
        if left < MIN_START:
            record.append({"step": name, "command": cmd, "status": "skipped (budget spent)", "seconds": 0})
            print(f"gpu-check: {name}: skipped, {left:.0f} s left", flush=True)
            continue
        limit = min(cap, left)
        print(f"gpu-check: {name} (at most {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out at {limit:.0f} s"
        secs = round(time.monotonic() - t0, 1)
        failed |= status != "ok"
        record.append({"step": name, "command": cmd, "status": status, "seconds": secs})
        print(f"gpu-check: {name}: {status} in {secs} s", flush=True)
        if name == "build" and status != "ok":
            break
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "gpu-check.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "budget_s": _args.budget, "steps": record}, f, indent=1)
    for r in record:
        print(f"  {r['step']:<14} {r['status']:<26} {r['seconds']:>7} s")
    return 1 if failed else 0


_args = None

if __name__ == "__main__":
    sys.exit(main())
