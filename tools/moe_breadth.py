"""The MoE breadth table of the README: per family, a tiny random model (tests/test_moe.py's configs), a PEFT
adapter with target_parameters on its experts (and target_modules on o_proj), ported with ``portllm port``
onto its sharded checkpoint and applied with ``apply_patch``, each against PEFT's merge_and_unload.

    .venv/bin/python tools/moe_breadth.py          # prints the markdown table
"""

from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def rel_err(got: dict, want: dict) -> float:
    worst = 0.0
    for k, w in want.items():
        d = (got[k].double() - w.double()).abs().max().item()
        worst = max(worst, d / max(w.double().abs().max().item(), 1e-30))
    return worst


def main() -> int:
    import transformers

    import portllm
    import test_moe as t
    from portllm.patch import Patch

    transformers.logging.set_verbosity_error()
    print("| family | expert parameters (in memory) | on disk | expert tensors ported | port vs PEFT (max rel. err, fp32) "
          "| apply_patch vs PEFT |")
    print("|---|---|---|---:|---:|---:|")
    for fam in sorted(t.FAMILIES):
        with tempfile.TemporaryDirectory() as d:
            model = t.build(fam)
            pm = t.adapter(model, os.path.join(d, "a"))
            want = pm.merge_and_unload().state_dict()
            model.save_pretrained(os.path.join(d, "base"), max_shard_size="20KB")
            lines = []
            portllm.port(os.path.join(d, "base"), os.path.join(d, "a"), os.path.join(d, "out"), progress=False,
                         log=lines.append)
            mapped = next(int(x.split("onto ")[1].split()[0]) for x in lines if "expert parameters" in x)
            got = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(d, "out")).state_dict()
            from safetensors import safe_open

            keys = set()
            for f in os.listdir(os.path.join(d, "base")):
                if f.endswith(".safetensors"):
                    with safe_open(os.path.join(d, "base", f), "pt") as fh:
                        keys |= set(fh.keys())
            exp = model.model.layers[0].mlp.experts
            mem = ", ".join(f"{n} {list(p.shape)}" for n, p in exp.named_parameters(recurse=False) if p.dim() == 3)
            disk = sorted(k.split("layers.0.")[1] for k in keys if "layers.0." in k and "experts" in k
                          and "shared" not in k)
            disk = disk[0] + (f" … ({len(disk)} tensors)" if len(disk) > 1 else "")
            applied = t.build(fam)
            portllm.apply_patch(applied, Patch.load(os.path.join(d, "a")))
            print(f"| {fam} | {mem}{' (transposed)' if getattr(exp, 'is_transposed', False) else ''} | {disk} | "
                  f"{mapped} | {rel_err(got, want):.1e} | {rel_err(applied.state_dict(), want):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
