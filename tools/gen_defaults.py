"""Generates portllm/_defaults_table.py, the default backend order per op and device class, from the
committed benchmark results (benchmarks/results/*.json).

    python tools/gen_defaults.py            # rewrite the table
    python tools/gen_defaults.py --check    # exit 1 if the table differs from the results

    python tools/gen_defaults.py --stamp-commits   # give rows measured before hashes were recorded
                                                   # the hash of their suite's commit's kernel source

Rule: for each device class and op, a backend enters the order only if it was faster than the
reference in every case measured (its median time over the reference's, in the same run, below 1);
those are ranked by the geometric mean of that ratio, fastest first, and the reference closes it.
Only rows measured on the kernel as it is now count: each row records the hash of the source of the
backend it timed (``source_hashes``, ``portllm.sources``), and a row whose hash is not the tree's
(or that has none) is stale and ignored, so a kernel edited since its measurement is no default
until it is measured again. A kernel in ``NEVER_DEFAULT`` is never one. The table records the hashes it was made from (``SOURCES``), for
``portllm info``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pprint
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from portllm import sources  # noqa: E402
TABLE_PATH = os.path.join(ROOT, "portllm", "_defaults_table.py")
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# op whose default is chosen -> (benchmark op, provider prefix, the cases that count)
SOURCES = {
    "patch_add_": ("patch_add_", "portllm-", lambda r: r.get("case") == "single"),
    "skeleton_mm": ("pmss_layer", "pmss-", lambda r: True),
    # the two serving ops run together (PatchedLinear), so one benchmark decides both
    "lora_shrink": ("serve_layer", "serve-", lambda r: True),
    "lora_expand_": ("serve_layer", "serve-", lambda r: True),
    "bit_misses": ("bit_misses", "bit_misses-", lambda r: True),
    "fp8_merge": ("fp8_merge", "fp8_merge-", lambda r: True),
    "mxfp4_merge": ("mxfp4_merge", "mxfp4_merge-", lambda r: True),
}
# Only the ops' backends can be defaults (the PMSS layer's "pmss-gemm" form is measured beside them).
BACKENDS = ("reference", "cpp", "cuda", "triton")
# Kernels kept as tested options that are never a default, whatever a benchmark says, with why.
NEVER_DEFAULT = {
    ("skeleton_mm", "cuda"): "fp32 FMA by design, no tensor cores: cuBLAS on the gathered skeleton wins "
                             "(5.2 ms against 1.3 ms on the H100, ../shared/gpu); issue #23",
}


def isa_of(result: dict, row: dict) -> str:
    """The CPU vector path a row was measured on: the row's own "isa", else the build's best."""
    if row.get("isa"):
        return row["isa"]
    build = result.get("versions", {}).get("portllm_build", "")
    word = next((w.split("=", 1)[1] for w in build.split() if w.startswith("cpu=")), "generic")
    return word.replace("+", "")  # older builds wrote "avx512+bf16"


def device_class(result: dict, row: dict) -> str:
    kind = result["device"]["type"]
    return f"cpu-{isa_of(result, row)}" if kind == "cpu" else kind


def backend_of(row: dict, op: str) -> str | None:
    """The backend of ``op`` that ``row`` timed, or None where the row is not one of ``op``'s."""
    bench_op, prefix, counts = SOURCES[op]
    provider = str(row.get("provider", ""))
    if row.get("op") != bench_op or not provider.startswith(prefix) or not counts(row):
        return None
    backend = provider[len(prefix):].split("@")[0]
    return backend if backend in BACKENDS else None


def stamp(row: dict, hash_of=sources.source_hash) -> dict:
    """Records in ``row`` the source hash of every op's backend it timed (``source_hashes``); returns it."""
    for op in SOURCES:
        backend = backend_of(row, op)
        h = hash_of(op, backend) if backend not in (None, "reference") else None
        if h is not None:
            row.setdefault("source_hashes", {})[op] = h
    return row


def fresh(row: dict, op: str, backend: str) -> bool:
    """Whether ``row`` timed ``op``'s ``backend`` kernel as its source is now."""
    now = sources.source_hash(op, backend)
    return now is not None and row.get("source_hashes", {}).get(op) == now


def generate(paths: list[str], with_sources: bool = False):
    ratios: dict[tuple[str, str], dict[str, list[float]]] = {}
    used: dict[tuple[str, str], dict[str, str]] = {}
    for path in sorted(paths):
        with open(path) as f:
            result = json.load(f)
        for op, (bench_op, prefix, counts) in SOURCES.items():
            rows = [r for r in result["results"] if r.get("op") == bench_op and counts(r)
                    and str(r.get("provider", "")).startswith(prefix)]
            # per case: the reference's time (it does not depend on the CPU path) and each
            # (device class, backend)'s time
            cases: dict[tuple, dict] = {}
            for r in rows:
                key = (r.get("m"), r.get("n"), r.get("r"), r.get("dtype"), r.get("factor_dtype"), r.get("tokens"),
                       r.get("n_in"), r.get("n_out"), r.get("T"), r.get("case"), r.get("graph"))
                backend = r["provider"][len(prefix):]
                if backend not in BACKENDS or (op, backend) in NEVER_DEFAULT \
                        or (backend != "reference" and not fresh(r, op, backend)):
                    continue
                case = cases.setdefault(key, {"ref": None, "times": {}})
                # A time paired with a baseline in the same test (serve: the base GEMM) compares
                # better than medians of tests run minutes apart.
                t = r.get("time_vs_base", r["median_ms"])
                if backend == "reference":
                    case["ref"] = t
                else:
                    case["times"][(device_class(result, r), backend)] = t
                    used.setdefault((device_class(result, r), op), {})[backend] = r["source_hashes"][op]
            for case in cases.values():
                if not case["ref"]:
                    continue
                for (cls, backend), t in case["times"].items():
                    ratios.setdefault((cls, op), {}).setdefault(backend, []).append(t / case["ref"])
    table: dict[str, dict[str, list[str]]] = {}
    for (cls, op), per in sorted(ratios.items()):
        gm = {b: math.exp(sum(math.log(x) for x in v) / len(v)) for b, v in per.items() if max(v) < 1.0}
        table.setdefault(cls, {})[op] = [b for b, _ in sorted(gm.items(), key=lambda kv: kv[1])] + ["reference"]
    if not with_sources:
        return table
    made_from = {cls: {op: {b: used[(cls, op)][b] for b in order if b != "reference"}
                       for op, order in per.items()} for cls, per in table.items()}
    return table, made_from


def render(table: dict, made_from: dict) -> str:
    return ('"""Generated by tools/gen_defaults.py from benchmarks/results/*.json: do not edit.\n\n'
            "Per device class and op, the backends measured faster than the reference, fastest first, then\n"
            "the reference (see portllm/defaults.py); SOURCES: the hash of each default kernel's source that\n"
            'was measured (portllm.sources)."""\n\n'
            f"TABLE = {pprint.pformat(table, width=100, sort_dicts=True)}\n\n"
            f"SOURCES = {pprint.pformat(made_from, width=100, sort_dicts=True)}\n")


def stamp_commits(paths: list[str]) -> int:
    """Rows without ``source_hashes`` get the hashes of the kernel source in their suite's commit (the
    results say which commit measured each suite); a tree that was dirty then is taken as committed,
    and the row says so (``source_hashes_from``). Returns the number of rows stamped."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from suite import discover

    suite_of = {op: name for name, s in discover().items() for op in s.ops}
    n = 0
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        for r in result["results"]:
            if "source_hashes" in r:
                continue
            commit = (result.get("suites", {}).get(suite_of.get(r.get("op")), {}) or {}).get("commit") \
                or result.get("commit")
            if not commit:
                continue
            sha = commit.removesuffix("-dirty")
            stamp(r, lambda op, b: sources.source_hash_at(sha, op, b, ROOT))
            if "source_hashes" in r:
                r["source_hashes_from"] = f"commit {sha[:12]}" + (" (the run's tree was dirty: as committed)"
                                                                  if commit.endswith("-dirty") else "")
                n += 1
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    return n


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--stamp-commits" in argv:
        print(f"stamped {stamp_commits(sorted(glob.glob(os.path.join(RESULTS, '*.json'))))} rows")
        return 0
    text = render(*generate(glob.glob(os.path.join(RESULTS, "*.json")), with_sources=True))
    if "--check" in argv:
        with open(TABLE_PATH) as f:
            same = f.read() == text
        print("portllm/_defaults_table.py is " + ("up to date" if same else "OUT OF DATE: run tools/gen_defaults.py"))
        return 0 if same else 1
    tmp = TABLE_PATH + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, TABLE_PATH)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
