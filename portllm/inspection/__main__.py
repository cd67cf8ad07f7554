"""python -m portllm.inspection [--json PATH] [--arch 90,80]: every design compiled for each
architecture, its stats and checks as a table (and as JSON). Run it with TRITON_INTERPRET unset: under
the interpreter Triton's kernels are not compiled."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def run(archs=(90, 80)) -> list[dict]:
    from portllm.inspection import build, checks, designs

    rows = []
    for d in designs.designs():
        fn = getattr(importlib.import_module(f"portllm.kernels.{d.module}"), d.kernel)
        for cc in archs:
            arch = designs.ARCHS[cc]
            row = {"design": d.name, "arch": arch}
            try:
                st = build.compile_stats(fn, d.args, d.meta, cc)
            except Exception as e:  # noqa: BLE001 - a design that does not compile is a row that says so
                row["error"] = f"{type(e).__name__}: {e}"[:300]
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
    from portllm.inspection import toolchain

    ap = argparse.ArgumentParser(prog="python -m portllm.inspection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--arch", default="90,80", help="compute capabilities (default 90,80)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: Triton's kernels are interpreted here, not compiled; unset it", file=sys.stderr)
        return 2
    why = toolchain.unavailable()
    if why:
        print(f"kernel inspection unavailable: {why}", file=sys.stderr)
        return 3
    rows = run(tuple(int(a) for a in args.arch.split(",")))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
