"""python -m portllm.inspection [--json PATH] [--arch 90,80]: every design compiled for each
architecture (the Triton kernels by Triton, csrc/cuda by nvcc), its stats and checks as a table (and
as JSON). Run it with TRITON_INTERPRET unset: under
the interpreter Triton's kernels are not compiled."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def _cuda_stats(d, cache: dict) -> dict:
    """{arch: stats} of a CUDA design: its source compiled once per run (and cached by source hash)."""
    import re

    from portllm.inspection import build, cuda, toolchain

    src = os.path.join(cuda.ROOT, "csrc", "cuda", d.module)
    if src not in cache:
        try:
            cache[src] = cuda.compile_stats(src, toolchain.cuobjdump(), build.cache_dir())
        except Exception as e:  # noqa: BLE001 - every design of the source says so
            cache[src] = e
    if isinstance(cache[src], Exception):
        raise cache[src]
    out = {}
    for arch, fns in cache[src].items():
        hits = [st for fn, st in fns.items() if re.search(d.kernel, fn)]
        if len(hits) != 1:
            raise RuntimeError(f"{d.module}: {len(hits)} kernels match {d.kernel!r} for {arch}")
        out[arch] = dict(hits[0], threads=d.threads)
    return out


def run(archs=(90, 80), langs=("triton", "cuda")) -> list[dict]:
    from portllm.inspection import build, checks, designs

    rows, objects = [], {}
    for d in designs.designs():
        if d.lang not in langs:
            continue
        fn = getattr(importlib.import_module(f"portllm.kernels.{d.module}"), d.kernel) if d.lang == "triton" else None
        for cc in archs:
            arch = designs.ARCHS[cc]
            row = {"design": d.name, "arch": arch, "lang": d.lang}
            try:
                st = build.compile_stats(fn, d.args, d.meta, cc) if fn else _cuda_stats(d, objects)[arch]
            except Exception as e:  # noqa: BLE001 - a design that does not compile is a row that says so
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                rows.append(row)
                continue
            row["stats"] = st
            row["checks"] = {}
            for c in d.checks:
                ok, seen = checks.CHECKS[c](st, arch, d)
                row["checks"][c] = {"ok": ok, "seen": seen, "known_fault": d.fault(c, arch)}
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| kernel | arch | regs | local + stack B | smem B | tensor-core instr | LDG widths | STG widths | cp.async | "
           "checks failed |", "|---" * 10 + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['design']} | {r['arch']} | compile failed: {r['error']} |" + " |" * 7)
            continue
        s = r["stats"]
        failed = [c + (" (known)" if v["known_fault"] else "") for c, v in r["checks"].items() if not v["ok"]]
        out.append(f"| {r['design']} | {r['arch']} | {s['regs']} | {s['local'] + s['stack']} | {s['shared']} | "
                   f"{s['wgmma'] + s['mma']} | {s['ldg']} | {s['stg']} | {s['cp_async']} | "
                   f"{', '.join(failed) or 'none'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from portllm.inspection import cuda, toolchain

    ap = argparse.ArgumentParser(prog="python -m portllm.inspection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--arch", default="90,80", help="compute capabilities (default 90,80)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: Triton's kernels are interpreted here, not compiled; unset it", file=sys.stderr)
        return 2
    why = {"triton": toolchain.unavailable()}
    why["cuda"] = why["triton"] or cuda.unavailable()  # the CUDA objects are read with Triton's cuobjdump
    for lang, w in why.items():
        if w:
            print(f"kernel inspection of the {lang} kernels unavailable: {w}", file=sys.stderr)
    langs = tuple(lang for lang, w in why.items() if not w)
    if not langs:
        return 3
    rows = run(tuple(int(a) for a in args.arch.split(",")), langs)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
