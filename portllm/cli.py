"""The `portllm` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from portllm import demo

    res = demo.run(hidden=args.hidden, layers=args.layers, rank=args.rank, dtype=args.dtype,
                   backend=args.backend, seed=args.seed, device=args.device)
    return 0 if res["max_ulp"] <= 1 else 1


def _info(args) -> int:
    import torch

    from portllm import __version__, _ext, ops

    print(f"portllm {__version__}, torch {torch.__version__}")
    print(f"extension: {_ext.build_info()}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends on {dev}: {', '.join(ops.available_backends(dev))}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="portllm", description="Portable LoRA patches and PMSS fine-tuning.")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="port a patch onto a small random Llama and check it")
    d.add_argument("--hidden", type=int, default=512)
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--rank", type=int, default=8)
    d.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    d.add_argument("--backend", default=None, help="reference, cpp, cuda or triton (default: fastest)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.set_defaults(fn=_demo)
    i = sub.add_parser("info", help="show the build and the available backends")
    i.set_defaults(fn=_info)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # one line for the user, the traceback on request
        if args.verbose:
            raise
        print(f"portllm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
