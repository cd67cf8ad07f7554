"""The `portllm` command line."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys

# What each command imports beyond portllm's own dependencies, and the extra that installs it.
REQUIREMENTS = {
    "demo": ("demo", ("transformers", "peft", "matplotlib")),
    "check": ("demo", ("transformers",)),
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
        from portllm.experiment.report import table
        from portllm.experiment.run import run

        results = run(out, quick=args.quick, seed=args.seed, seeds=args.seeds)
        print()
        print(table(results), end="")
        print(f"finished in {results['seconds']:.0f} s")
    print(f"results: {out}/results.json, {out}/accuracy.png" + ("" if all(user) else f", {out}/table.md"))
    return 0


def _process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return max(0.0, up - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _command_line() -> bool:
    """Whether this process is the ``portllm`` command (its console script, or ``python -m portllm.cli``)."""
    return __name__ == "__main__" or os.path.basename(sys.argv[0]) in ("portllm", "portllm.exe")


def _check(args) -> int:
    from portllm.atomic import check_disjoint, write_json
    from portllm.check import check_portability

    if args.json:  # before the work, not after it
        check_disjoint(args.json, {"--base": args.base, "--model": args.model, "--patch": args.patch,
                                   "--prompts": args.prompts})
    rep = check_portability(args.base, args.model, args.patch, args.prompts, device=args.device,
                            dtype=args.dtype, max_new_tokens=args.max_new_tokens, calibrate=args.calibrate,
                            scale=args.scale)
    for line in rep.lines():
        print(f"portllm check: {line}")
    if args.json:
        write_json(args.json, rep.to_dict(), indent=2)
    return 3 if rep.harm else 0


def _check_before_port(args) -> float:
    """``port --check``: the portability check on the prompts, after every check the port makes before it
    writes (a dry run) and before the port; a predicted harm at the scale the port will write is refused
    unless --ignore-harm (with --calibrate: at the patch scale it chose; a chosen scale of 0 ports θ′
    unchanged and is never harm). Returns the patch scale to port at."""
    import os

    from portllm.check import check_portability
    from portllm.patch import Patch

    patch = Patch.load(args.patch)
    base = args.base or patch.base_model
    if not base or not os.path.isdir(base):
        raise ValueError(f"--check needs the patch's base model (θ) as a local directory: pass --base (the patch "
                         f"names {patch.base_model!r})")
    rep = check_portability(base, args.model, patch, args.check, device=args.device, calibrate=args.calibrate,
                            dtype=args.dtype, scale=args.scale)
    for line in rep.lines():
        print(f"portllm port: check: {line}")
    if args.calibrate:
        if rep.calibrated_harm and not args.ignore_harm:
            raise ValueError(f"the check predicts that the patch harms {args.model} on these prompts even at the "
                             f"calibrated scale {rep.scale:g} (gain in probability per token {rep.calibrated_gain:+.3f}); "
                             "nothing written (--ignore-harm ports anyway)")
        print(f"portllm port: porting at patch scale {rep.scale:g} (calibrated)"
              + (": the output is the model unchanged" if rep.scale == 0 else ""))
        return rep.scale
    if rep.harm and not args.ignore_harm:
        raise ValueError(f"the check predicts that the patch harms {args.model} on these prompts (gain "
                         f"in probability per token {rep.gain_evolved:+.3f}); nothing written (--ignore-harm ports anyway)")
    return args.scale


def _port(args) -> int:
    from portllm.port import port

    # The command line's start-up (the interpreter, torch and portllm's imports: the import above), stated
    # apart from the job; not for a caller of main(argv), whose process started long before.
    startup = _process_seconds() if getattr(args, "command_line", False) else None
    if (args.calibrate or args.ignore_harm) and not args.check:
        raise ValueError(f"{'--calibrate' if args.calibrate else '--ignore-harm'} needs --check PROMPTS (the "
                         "portability check on your task's prompts)")
    if args.calibrate and args.scale != 1.0:
        raise ValueError("--calibrate chooses the patch scale; leave out --scale")
    kw = dict(device=args.device, dtype=args.dtype, force=args.force, backend=args.backend, base=args.base,
              rounding=args.rounding, seed=args.seed, fp4_scales=args.fp4_scales, fp4_clip=args.fp4_clip,
              allow_low_retention=args.allow_low_retention)
    scale = args.scale
    if args.check:  # what the port would refuse, refused before the (longer) check
        port(args.model, args.patch, args.out, scale=scale, progress=False, log=None, dry_run=True, **kw)
        scale = _check_before_port(args)
    res = port(args.model, args.patch, args.out, scale=scale, progress=not args.quiet,
               log=None if args.quiet else print, **kw)
    gpu = f", peak GPU memory {res.peak_device_bytes / 2**20:.1f} MiB" if res.peak_device_bytes is not None else ""
    print(f"portllm port: merged {res.merged} modules of {res.tensors} tensors into {res.out_dir} "
          f"({res.bytes_written / 1e9:.2f} GB) on {res.device} in {res.seconds:.1f} s{gpu}"
          + (f"; start-up (Python, torch, portllm) {startup:.1f} s before that" if startup is not None else ""))
    return 0


def _extract(args) -> int:
    from portllm.atomic import check_disjoint
    from portllm.extract import extract_patch

    inputs = {"--base": args.base, "--finetuned": args.finetuned}
    check_disjoint(args.out, inputs)  # before the work, not after it
    patch = extract_patch(args.base, args.finetuned, rank=args.rank, energy=args.energy, device=args.device,
                          progress=not args.quiet)
    patch.save(args.out, overwrite=args.force, inputs=inputs)
    kept = list(patch.extra["energy_kept"].values())
    ranks = [m.rank for m in patch.modules.values()] + list((patch.expert_config.get("rank_pattern") or {}).values())
    ranks += [patch.expert_config["r"]] if patch.expert_factors else []
    experts = sum(1 for k in patch.extra["energy_kept"] if k.endswith("]"))
    expert_part = (f" and {len(patch.expert_factors)} expert parameters ({experts} experts)"
                   if patch.expert_factors else "")
    print(f"portllm extract: {len(patch)} modules{expert_part}, rank {min(ranks)}..{max(ranks)}, "
          f"energy kept {min(kept):.1%}..{max(kept):.1%} -> {args.out}")
    from portllm.vllm_limits import serving_note

    print(f"portllm extract: {serving_note(patch)}")
    return 0


def _inspect(args) -> int:
    from portllm.patch import Patch

    patch = Patch.load(args.path)
    rows = patch.summary()
    summary = args.summary if args.summary is not None else len(rows) > SUMMARY_ABOVE
    print(f"patch: {args.path}")
    print(f"  source: {patch.source or '?'}; made with portllm {patch.version}; base model: {patch.base_model or '?'}"
          f" (fingerprint {patch.base_fingerprint or 'none'})")
    total = sum(r["bytes"] for r in rows)
    ranks = sorted({r["rank"] for r in rows})
    print(f"  {len(rows)} modules, ranks {ranks}, {total / 2**20:.2f} MiB of factors")
    if patch.expert_factors:
        nbytes = sum(f.B.numel() * f.B.element_size() + f.A.numel() * f.A.element_size()
                     for f in patch.expert_factors.values())
        targets = ", ".join(patch.expert_config.get("target_parameters") or [])
        print(f"  and LoRA on {len(patch.expert_factors)} mixture-of-experts parameters (target_parameters: {targets}), "
              f"{nbytes / 2**20:.2f} MiB of factors; port and apply_patch map them onto the model's experts")
        if not summary:
            for key, f in sorted(patch.expert_factors.items()):
                print(f"    {key}: lora_A {tuple(f.A.shape)} [experts·r, in], lora_B {tuple(f.B.shape)} [out, experts·r]")
    kept = patch.extra.get("energy_kept", {})
    if summary:
        _inspect_summary(rows, kept)
        for k, v in patch.extra.items():
            if k != "energy_kept":
                print(f"  {k}: {v}")
        return 0
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


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


SUMMARY_ABOVE = 50  # inspect shows one line per kind of module above this many modules


def _inspect_summary(rows, kept):
    """One line per kind of module (the name's last part: q_proj, down_proj, ...)."""
    kinds: dict[str, list] = {}
    for r in rows:
        kinds.setdefault(r["module"].rsplit(".", 1)[-1], []).append(r)
    print("  summary by kind (--full for every module):")
    width = max([len(k) for k in kinds] + [4])
    print(f"  {'kind':<{width}}  {'modules':>7} {'shapes':>22} {'ranks':>9} {'|dW|_F max':>10} {'MiB':>8}"
          + ("  energy kept" if kept else ""))
    for kind, rs in kinds.items():
        shapes = sorted({"x".join(map(str, r["shape"])) for r in rs})
        ranks = sorted({r["rank"] for r in rs})
        energy = ""
        if kept:
            ks = [kept[r["module"]] for r in rs if r["module"] in kept]
            energy = f"  {min(ks):.1%}..{max(ks):.1%}" if ks else ""
        print(f"  {kind:<{width}}  {len(rs):>7} {', '.join(shapes)[:22]:>22} "
              f"{(str(ranks[0]) if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'):>9} "
              f"{max(r['delta_norm'] for r in rs):>10.4g} {sum(r['bytes'] for r in rs) / 2**20:>8.2f}{energy}")


def _info(args) -> int:
    import torch

    from portllm import __version__, _ext, defaults, ops

    print(f"portllm {__version__}, torch {torch.__version__}")
    print(f"extension: {_ext.build_info()}; CPU path in use: {_ext.cpu_isa()}")
    for line in _ext.kernels_built():
        print(f"  {line}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends on {dev}: {', '.join(ops.available_backends(dev))} (device class {defaults.device_class(dev)})")
        for op, impls in ops.IMPLEMENTATIONS.items():
            fresh = defaults.measured_on_current_source(op, dev)
            said = "; ".join(f"{b} measured on this source" if ok else f"{b} measured on another source"
                             if ok is False else f"{b}: no source here to compare" for b, ok in fresh.items())
            print(f"  {op}: backends {', '.join(ops.available_backends(dev, op))} (default first; "
                  + (said or "no kernel measured faster than the reference on this device class, as its source is now") + ")")
            for name, impl in impls.items():
                why = ops.backend_unavailable_reason(name, dev, op)
                print(f"    {name:<9} {impl.where}" + (f"  [unavailable: {why}]" if why else ""))
    return 0


def main(argv=None) -> int:
    from portllm._version import __version__

    ap = argparse.ArgumentParser(prog="portllm", description="Portable LoRA patches and PMSS fine-tuning.",
                                 epilog="Run `portllm COMMAND -h` for a command's options and an example.")
    ap.add_argument("--version", action="version", version=f"portllm {__version__}")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description, example):
        return sub.add_parser(name, help=help, description=f"{description}\n\nexample:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    d = command("demo", "the portability experiment end to end (or on your own checkpoints)",
                "Per seed: pretrains a small Llama, evolves it into five releases, fine-tunes patches on three\n"
                "tasks (lr chosen on a val split), ports every patch onto every release, re-fine-tunes every\n"
                "release, evaluates on a test split and checks every port's portability (5 seeds: about 8\n"
                "minutes on a 2-core CPU). With\n"
                "--base/--evolved/--patch/--tasks: the same evaluation on your own checkpoints.",
                "portllm demo --out demo-out --seed 0")
    d.add_argument("--out", default="demo-out", help="directory for results.json, table.md, accuracy.png")
    d.add_argument("--quick", action="store_true", help="a shorter run (for tests)")
    d.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    d.add_argument("--seeds", type=int, default=None, help="how many seeds, run side by side (default 5; 2 "
                   "with --quick)")
    d.add_argument("--base", help="your base checkpoint directory (θ)")
    d.add_argument("--evolved", help="its evolved version (θ′)")
    d.add_argument("--patch", help="a patch (PEFT adapter directory) made on θ")
    d.add_argument("--tasks", help="JSON lines of {\"task\", \"prompt\", \"answer\"} to evaluate on")
    d.set_defaults(fn=_demo)
    i = command("info", "show the build and the available backends",
                "The version, the compiled extension (CPU path, CUDA kernels) and, per op and device, the\n"
                "backends that can run and the default.", "portllm info")
    i.set_defaults(fn=_info)

    p = command("port", "merge a patch into a checkpoint directory, streamed, into a new one",
                "Writes --model with the patch merged into every module it names (W += s*B*A), tensor by\n"
                "tensor, to --out; --model and --patch are only read. A compatibility report comes first.",
                "portllm port --model Llama-3.1-8B-v2 --patch my-lora --out Llama-3.1-8B-v2-mine")
    p.add_argument("--model", required=True, help="checkpoint directory (safetensors) to patch; only read")
    p.add_argument("--patch", required=True, help="PEFT LoRA adapter directory, or a patch portllm saved")
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent unless --force)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the patch (default 1)")
    p.add_argument("--device", default=None, help="where to merge: cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="convert the weights to this dtype (an FP8 checkpoint: write it dequantized, its "
                        "scales and quantization_config dropped)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--backend", default=None, help="portllm backend for the merges (default: fastest)")
    p.add_argument("--base", default=None, help="the model the patch was trained on (only read): the report "
                   "measures how far --model moved from it (default: the adapter's base_model_name_or_path, "
                   "if that is a local directory)")
    p.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"],
                   help="FP8, MXFP4 and NVFP4 checkpoints: how merged weights are requantized (default nearest; stochastic keeps "
                        "the patch in expectation; the report says how much survived)")
    p.add_argument("--seed", type=int, default=0, help="seed of --rounding stochastic (default 0)")
    p.add_argument("--fp4-scales", default="reuse", choices=["reuse", "fresh"],
                   help="MXFP4 and NVFP4 checkpoints: keep each block's scale (default) or recompute it as the "
                        "format's quantizer does")
    p.add_argument("--fp4-clip", default="rescale", choices=["rescale", "refuse"],
                   help="MXFP4 / NVFP4 with --fp4-scales reuse: a block the merge no longer fits in its scale is rescaled "
                        "(default) or refused")
    p.add_argument("--allow-low-retention", action="store_true",
                   help="MXFP4 / NVFP4: write the port even if less than half of the patch survived requantization")
    p.add_argument("--check", metavar="PROMPTS", default=None,
                   help="run the portability check (`portllm check`) on these prompts first (a text file, one per "
                        "line, or JSONL; no answers), after the port's own checks; a predicted harm is refused "
                        "unless --ignore-harm")
    p.add_argument("--ignore-harm", action="store_true",
                   help="with --check: port even where the check predicts harm")
    p.add_argument("--calibrate", action="store_true",
                   help="with --check: port at the patch scale in [0, 1.5] that agrees best with the patch on its "
                        "own base (the check's calibration; not with --scale)")
    p.add_argument("--quiet", action="store_true", help="no report or progress bar")
    p.set_defaults(fn=_port)

    c = command("check", "will the patch help on the evolved model? (from its outputs on your prompts)",
                "Runs θ, θ+Δ, θ′ and θ′+Δ (the patch unmerged, one model in memory at a time) on your task's\n"
                "prompts, without answers, and reports a portability score (the share of the patch's effect on\n"
                "its own base that it keeps on θ′), a predicted harm, and per-module diagnostics. Exit status 3\n"
                "when it predicts harm.",
                "portllm check --base Llama-3.1-8B --model Llama-3.1-8B-v2 --patch my-lora --prompts prompts.txt")
    c.add_argument("--base", required=True, help="the model the patch was trained on (θ); only read")
    c.add_argument("--model", required=True, help="the evolved model (θ′); only read")
    c.add_argument("--patch", required=True, help="PEFT LoRA adapter directory, or a patch portllm saved")
    c.add_argument("--prompts", required=True, help="your task's prompts: a text file (one per line) or JSONL "
                   "({\"prompt\": ...} per line)")
    c.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    c.add_argument("--max-new-tokens", type=int, default=8, help="tokens of θ+Δ's answers to score (default 8)")
    c.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="run the models in this dtype (default float32; quantized checkpoints are dequantized)")
    c.add_argument("--scale", type=float, default=1.0, help="judge θ′ + scale·Δ (what `port --scale` writes; "
                   "default 1)")
    c.add_argument("--json", default=None, help="also write the report to this JSON file")
    c.add_argument("--calibrate", action="store_true",
                   help="also the patch scale in [0, 1.5] with which θ′ + s·Δ agrees best with θ+Δ")
    c.set_defaults(fn=_check)

    e = command("extract", "a low-rank patch from a full fine-tune (truncated SVD of each dW)",
                "A PEFT-format patch whose modules approximate finetuned - base (rank r, or the smallest\n"
                "rank that keeps a fraction of each dW's energy). Mixture-of-experts weights become an\n"
                "expert LoRA per expert (PEFT's target_parameters), one rank per expert parameter.",
                "portllm extract --base base-model --finetuned tuned-model --rank 16 --out tuned-patch")
    e.add_argument("--base", required=True, help="the base checkpoint directory")
    e.add_argument("--finetuned", required=True, help="the fine-tuned checkpoint directory")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank of every module (randomized SVD)")
    g.add_argument("--energy", type=float, help="keep this fraction of each dW's Frobenius energy (exact SVD)")
    e.add_argument("--out", required=True, help="patch directory to write (PEFT adapter format)")
    e.add_argument("--device", default=None)
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=_extract)

    n = command("inspect", "modules, ranks, norms, sizes and metadata of a patch",
                f"One line per module, or, above {SUMMARY_ABOVE} modules, one per kind of module (q_proj, ...).",
                "portllm inspect my-lora --summary")
    n.add_argument("path", help="a patch: PEFT adapter directory, or its adapter_model.safetensors")
    mode = n.add_mutually_exclusive_group()
    mode.add_argument("--summary", action="store_true", default=None, help="one line per kind of module")
    mode.add_argument("--full", dest="summary", action="store_false", default=None, help="one line per module")
    n.set_defaults(fn=_inspect)
    for sp in (d, i, p, e, n, c):
        sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    args = ap.parse_args(argv)
    try:
        require(args.command)
        args.command_line = argv is None
        code = args.fn(args)
        if argv is None and code == 0 and args.command in ("port", "extract") and _command_line():
            # The command line (not a caller of main): the output is complete, fsynced and renamed into
            # place; skip Python's teardown of torch, which took 0.6-0.7 s (import torch alone, then exit) on this repository's EPYC.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return code
    except BrokenPipeError as e:
        if args.verbose or not _stdout_closed():
            if args.verbose:
                raise
            print(f"portllm {args.command}: error: {e}", file=sys.stderr)
            return 1
        # The reader of stdout went away (`portllm inspect ... | head`): stop quietly, as Unix tools do.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except KeyboardInterrupt:
        if args.verbose:
            raise
        # port and extract stage their output and rename it at the end: interrupted, they leave none.
        staged = f"; no partial output was left at {args.out}" if args.command in ("port", "extract") else ""
        print(f"portllm {args.command}: interrupted{staged}", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user, the traceback on request
        if args.verbose:
            raise
        msg = str(e)
        out = getattr(args, "out", None)
        if (isinstance(e, OSError) and e.filename is None and out is not None and args.command in ("port", "extract")
                and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)):
            # Write errors carry no path: name the output being written (staged, so left untouched).
            msg = f"{msg} (while writing {out}; no partial output was left there)"
        print(f"portllm {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
