"""The `portllm` command line."""

from __future__ import annotations

import argparse
import importlib.util
import sys

# What each command imports beyond portllm's own dependencies, and the extra that installs it.
REQUIREMENTS = {
    "demo": ("demo", ("transformers", "peft", "matplotlib")),
}


class MissingRequirementError(RuntimeError):
    """A command needs an optional package that is not installed; the message names the extra."""


def require(command: str):
    """Checks a command's optional requirements before it starts work."""
    if command not in REQUIREMENTS:
        return
    extra, modules = REQUIREMENTS[command]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingRequirementError(
            f"`portllm {command}` needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'portllm[{extra}]'")


def _demo(args) -> int:
    import os

    user = [args.base, args.evolved, args.patch, args.tasks]
    if any(user) and not all(user):
        raise ValueError("--base, --evolved, --patch and --tasks go together (your own checkpoints)")
    out = os.path.abspath(args.out)
    if all(user):
        from portllm.experiment.user import run_user

        run_user(args.base, args.evolved, args.patch, args.tasks, out)
    else:
        from portllm.experiment.run import run, table

        results = run(out, quick=args.quick, seed=args.seed)
        print()
        print(table(results), end="")
        print(f"finished in {results['seconds']:.0f} s")
    print(f"results: {out}/results.json, {out}/accuracy.png" + ("" if all(user) else f", {out}/table.md"))
    return 0


def _port(args) -> int:
    from portllm.port import port

    res = port(args.model, args.patch, args.out, scale=args.scale, device=args.device, dtype=args.dtype,
               force=args.force, backend=args.backend, progress=not args.quiet,
               log=None if args.quiet else print)
    gpu = f", peak GPU memory {res.peak_device_bytes / 2**20:.1f} MiB" if res.peak_device_bytes is not None else ""
    print(f"portllm port: merged {res.merged} modules of {res.tensors} tensors into {res.out_dir} "
          f"({res.bytes_written / 1e9:.2f} GB) on {res.device} in {res.seconds:.1f} s{gpu}")
    return 0


def _extract(args) -> int:
    from portllm.atomic import check_disjoint
    from portllm.extract import extract_patch

    inputs = {"--base": args.base, "--finetuned": args.finetuned}
    check_disjoint(args.out, inputs)  # before the work, not after it
    patch = extract_patch(args.base, args.finetuned, rank=args.rank, energy=args.energy, device=args.device)
    patch.save(args.out, overwrite=args.force, inputs=inputs)
    kept = list(patch.extra["energy_kept"].values())
    print(f"portllm extract: {len(patch)} modules, rank {min(m.rank for m in patch.modules.values())}"
          f"..{max(m.rank for m in patch.modules.values())}, energy kept {min(kept):.1%}..{max(kept):.1%} "
          f"-> {args.out}")
    return 0


def _inspect(args) -> int:
    from portllm.patch import Patch

    patch = Patch.load(args.path)
    rows = patch.summary()
    print(f"patch: {args.path}")
    print(f"  source: {patch.source or '?'}; made with portllm {patch.version}; base model: {patch.base_model or '?'}"
          f" (fingerprint {patch.base_fingerprint or 'none'})")
    total = sum(r["bytes"] for r in rows)
    ranks = sorted({r["rank"] for r in rows})
    print(f"  {len(rows)} modules, ranks {ranks}, {total / 2**20:.2f} MiB of factors")
    kept = patch.extra.get("energy_kept", {})
    width = max([len(r["module"]) for r in rows] + [6])
    print(f"  {'module':<{width}}  {'shape':>14} {'rank':>5} {'scale':>8} {'|dW|_F':>10} {'dtype':>9} {'KiB':>8}"
          + ("  energy kept" if kept else ""))
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        energy = f"  {kept[r['module']]:>11.2%}" if r["module"] in kept else ""
        print(f"  {r['module']:<{width}}  {shape:>14} {r['rank']:>5} {r['scale']:>8.4g} {r['delta_norm']:>10.4g} "
              f"{r['dtype']:>9} {r['bytes'] / 1024:>8.1f}{energy}")
    for k, v in patch.extra.items():
        if k != "energy_kept":
            print(f"  {k}: {v}")
    return 0


def _info(args) -> int:
    import torch

    from portllm import __version__, _ext, defaults, ops

    print(f"portllm {__version__}, torch {torch.__version__}")
    print(f"extension: {_ext.build_info()}; CPU path in use: {_ext.cpu_isa()}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends on {dev}: {', '.join(ops.available_backends(dev))} (device class {defaults.device_class(dev)})")
        for op, impls in ops.IMPLEMENTATIONS.items():
            print(f"  {op}: backends {', '.join(ops.available_backends(dev, op))} (default first)")
            for name, impl in impls.items():
                why = ops.backend_unavailable_reason(name, dev, op)
                print(f"    {name:<9} {impl.where}" + (f"  [unavailable: {why}]" if why else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="portllm", description="Portable LoRA patches and PMSS fine-tuning.")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the portability experiment end to end (or on your own checkpoints)")
    d.add_argument("--out", default="demo-out", help="directory for results.json, table.md, accuracy.png")
    d.add_argument("--quick", action="store_true", help="a shorter run (for tests)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--base", help="your base checkpoint directory (θ)")
    d.add_argument("--evolved", help="its evolved version (θ′)")
    d.add_argument("--patch", help="a patch (PEFT adapter directory) made on θ")
    d.add_argument("--tasks", help="JSON lines of {\"task\", \"prompt\", \"answer\"} to evaluate on")
    d.set_defaults(fn=_demo)
    i = sub.add_parser("info", help="show the build and the available backends")
    i.set_defaults(fn=_info)

    p = sub.add_parser("port", help="merge a patch into a checkpoint directory, streamed, into a new one")
    p.add_argument("--model", required=True, help="checkpoint directory (safetensors) to patch; only read")
    p.add_argument("--patch", required=True, help="PEFT LoRA adapter directory, or a patch portllm saved")
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent unless --force)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the patch (default 1)")
    p.add_argument("--device", default=None, help="where to merge: cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="convert the weights to this dtype")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--backend", default=None, help="portllm backend for the merges (default: fastest)")
    p.add_argument("--quiet", action="store_true", help="no report or progress bar")
    p.set_defaults(fn=_port)

    e = sub.add_parser("extract", help="a low-rank patch from a full fine-tune (truncated SVD of each dW)")
    e.add_argument("--base", required=True, help="the base checkpoint directory")
    e.add_argument("--finetuned", required=True, help="the fine-tuned checkpoint directory")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank of every module (randomized SVD)")
    g.add_argument("--energy", type=float, help="keep this fraction of each dW's Frobenius energy (exact SVD)")
    e.add_argument("--out", required=True, help="patch directory to write (PEFT adapter format)")
    e.add_argument("--device", default=None)
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.set_defaults(fn=_extract)

    n = sub.add_parser("inspect", help="modules, ranks, norms, sizes and metadata of a patch")
    n.add_argument("path")
    n.set_defaults(fn=_inspect)
    for sp in (d, i, p, e, n):
        sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    args = ap.parse_args(argv)
    try:
        require(args.command)
        return args.fn(args)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        # port and extract stage their output and rename it at the end: interrupted, they leave none.
        staged = f"; nothing was written to {args.out}" if args.command in ("port", "extract") else ""
        print(f"portllm {args.command}: interrupted{staged}", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user, the traceback on request
        if args.verbose:
            raise
        msg = str(e)
        out = getattr(args, "out", None)
        if isinstance(e, OSError) and e.filename is None and out is not None:
            # ENOSPC, EFBIG, EIO from a write carry no path: name the output being written.
            msg = f"{msg} (while writing {out}; nothing was written there)"
        print(f"portllm {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
