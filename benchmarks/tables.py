"""Markdown tables of a results JSON, for the README: python benchmarks/tables.py benchmarks/results/X.json"""

import json
import sys


def _f(r, k, fmt="{:.2f}"):
    return fmt.format(r[k]) if r.get(k) is not None else ""


def tables(d: dict) -> str:
    dev, v = d["device"], d["versions"]
    where = f"{dev['name']}, {dev['cores']} cores" if dev["type"] == "cpu" else f"{dev['name']}"
    L = [f"Measured on {where}, torch {v['torch']}, build `{v.get('portllm_build', '?')}`:"]
    runs = d.get("suites") or {"all": {"command": d["command"], "commit": d["commit"], "date": d["date"]}}
    for suite, run in runs.items():
        L.append(f"- {suite}: `{run['command']}`, commit `{str(run['commit'])[:12]}`, {str(run['date'])[:10]}")
    L.append("")
    rows = d["results"]
    pa = [r for r in rows if r["op"] == "patch_add_" and (r["m"], r["n"]) == (4096, 14336)]
    if pa:
        L += ["`patch_add_`, bf16 W, 4096×14336, factors bf16 or fp32 (one rank-r patch; four rank-16 patches with "
              "different scales). `@path`: the CPU path forced with PORTLLM_CPU_ISA; `fma-floor`: 2·m·n·r flops at "
              "that path's FMA rate measured in the same run; limit = max(fastest pass over W, FMA floor):", "",
              "| case | factors | provider | median ms | GB/s | × copy | × fastest pass | × addmm_ | × reference | "
              "time / limit | extra peak MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pa:
            case = "4 × rank-16" if r["case"] != "single" else (
                f"r={r['r']}" if r["provider"] not in ("copy", "in-place", "in-place int") else "—")
            extra = r["extra_peak_bytes"] / 2**20 if r.get("extra_peak_bytes") is not None else float("nan")
            prov = r["provider"] + (f"@{r['isa']}" if r.get("isa") else "")
            if r["provider"] == "fma-floor":
                if r.get("factor_dtype") == "float32":
                    continue  # the same floor as the bf16 row above
                L.append(f"| {case} | | {prov} ({r['fma_gflops']:.0f} GFLOP/s) | {r['median_ms']:.2f} | | | | | | | |")
                continue
            L.append(f"| {case} | {r.get('factor_dtype', 'bfloat16')} | {prov} | {r['median_ms']:.2f} | {r['gbps']:.1f} | "
                     f"{_f(r, 'fraction_of_copy_bandwidth')} | {_f(r, 'fraction_of_fastest_pass')} | "
                     f"{_f(r, 'speedup_vs_addmm_')} | {_f(r, 'speedup_vs_reference')} | {_f(r, 'time_vs_limit')} | "
                     f"{extra:.1f} |")
        L.append("")
    ports = [r for r in rows if r["op"] == "port"]
    if ports:
        sizes = {r["size"]: r for r in ports}
        L += ["Port of a rank-16 patch (all seven projections) onto Llama-shaped bf16 checkpoints of random weights ("
              + "; ".join(f"{k}: {r['params'] / 1e9:.2f}B parameters, {r['checkpoint_bytes'] / 1e9:.2f} GB"
                          for k, r in sizes.items())
              + f"), each job in its own process; the copy, the port and the command interleaved, median of "
              f"{ports[0].get('rounds', 1)} rounds:", "",
              "| size | job | seconds | peak RSS above the interpreter's, MiB | × copy+fsync | PEFT's time / this | "
              "PEFT's memory / this |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for r in ports:
            if r["case"] == "stages":
                continue
            rss = r.get("peak_rss_above_baseline")
            L.append(f"| {r['size']} | {r['provider']} | {r['seconds']:.2f} | "
                     f"{'' if rss is None else f'{rss / 2**20:.0f}'} | {_f(r, 'time_vs_copy')} | "
                     f"{_f(r, 'speedup_vs_peft')} | {_f(r, 'peft_memory_vs_this')} |")
        L.append("")
        stages = [r for r in ports if r["case"] == "stages"]
        if stages:
            L += ["Each stage of the port's stream alone, over the same bytes (GB/s): "
                  + "; ".join(f"{r['size']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_gbps"].items())
                              for r in stages)
                  + "; and the port, all stages overlapped: "
                  + "; ".join(f"{r['size']}: {r['checkpoint_bytes'] / r['seconds'] / 1e9:.2f}" for r in ports
                              if r["provider"] == "portllm port (job)") + ".", ""]
    layers = [r for r in rows if r["op"] == "pmss_layer"]
    if layers:
        r0 = layers[0]
        L += [f"PMSS layer forward + backward, {r0['m']}×{r0['n']} bf16, {r0['tokens']} tokens, 65,536 trainable "
              "parameters each (PMSS r=256, LoRA r=8):", "",
              "| provider | median ms | saved activations MiB | time / LoRA | dense-CUR time / this |",
              "|---|---:|---:|---:|---:|"]
        for r in layers:
            L.append(f"| {r['provider']} | {r['median_ms']:.1f} | {r['saved_activation_bytes'] / 2**20:.2f} | "
                     f"{_f(r, 'time_vs_lora')} | {_f(r, 'speedup_vs_dense_cur')} |")
        L.append("")
    for r in rows:
        if r["op"] == "pmss_select":
            how = {"deim": "DEIM as the pivots of an LU factorisation",
                   "deim-incremental": "DEIM by one rank-1 elimination per step (the form it replaced)"}.get(
                r["provider"], "DEIM by growing least-squares solves (the first form)")
            L += [f"Skeleton selection ({how}, r={r['r']}) of one 7B-Llama layer's seven projections: "
                  f"{r['median_ms'] / 1e3:.2f} s.", ""]
    serve = [r for r in rows if r["op"] == "serve_layer"]
    if serve:
        L += ["Patched layer (bf16, r=16): time over the base GEMM `x·Wᵀ` in the same run; `one patch`: every token "
              "routed to one patch; `8 mixed`: each token to one of eight, at random. `peft-style`: "
              "`x·Wᵀ + ((x·Aᵀ)·Bᵀ)·s`; `peft-loop`: a masked product per patch (PEFT's mixed batch); "
              "`serve-<backend>`: `PatchedLinear`" + ("; graph: inside a CUDA graph" if any(r["graph"] for r in serve)
                                                      else "") + ":", ""]
        keys = sorted({(r["n_in"], r["n_out"], r["T"], r["graph"]) for r in serve})
        provs = []
        for r in serve:
            p = (r["case"], r["provider"])
            if p not in provs and r["provider"] != "base":
                provs.append(p)
        head = ["W (in×out)", "T", "base ms"] + [f"{'1 patch' if c == 'one_patch' else '8 mixed'} {p}" for c, p in provs]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
        for n_in, n_out, T, graph in keys:
            cell = {(r["case"], r["provider"]): r for r in serve
                    if (r["n_in"], r["n_out"], r["T"], r["graph"]) == (n_in, n_out, T, graph)}
            base = cell.get(("one_patch", "base"))
            L.append(f"| {n_in}×{n_out} | {T}{' (graph)' if graph else ''} | "
                     f"{base['median_ms']:.3f} | " if base else f"| {n_in}×{n_out} | {T} | | ")
            L[-1] += " | ".join(_f(cell[p], "time_vs_base") if p in cell else "" for p in provs) + " |"
        L.append("")
    dec = [r for r in rows if r["op"] == "serve_decode"]
    if dec:
        r0 = dec[0]
        L += [f"Decoding (`model.generate`, greedy) with a Llama-shaped model of random weights ({r0['layers']} layers, "
              f"hidden {r0['hidden']}, bf16), batch {r0['batch']}, prompt {r0['prompt']}, {r0['new_tokens']} new tokens, "
              f"{r0['patches']} rank-{r0['r']} patches on all seven projections mixed over the rows:", "",
              "| provider | tokens/s | × base model | × PEFT |", "|---|---:|---:|---:|"]
        for r in dec:
            L.append(f"| {r['provider']} | {r['tokens_per_s']:.0f} | {_f(r, 'vs_base')} | {_f(r, 'vs_peft')} |")
        L.append("")
    undo = [r for r in rows if r["op"] == "exact_undo"]
    if undo:
        r0 = undo[0]
        L += [f"Exact undo, bf16 W {r0['m']}×{r0['n']}, r={r0['r']}, a delta of {r0['relative_delta']:.0%} of W: "
              f"{r0['exceptions']} exceptions stored, {r0['bits_per_weight']:.3f} bits per weight "
              "(a golden copy: 16):", "", "| step | median ms | × plain merge |", "|---|---:|---:|"]
        for r in undo:
            L.append(f"| {r['provider']} | {r['median_ms']:.1f} | {_f(r, 'time_vs_merge')} |")
        L.append("")
    L += ["Targets evaluated on that run (`targets` in the JSON):", ""]
    for t in d["targets"]:
        met = {True: "met", False: "not met", None: "not judged here"}[t["met"]]
        L.append(f"- {t['target']}: **{t['value']}** (goal {t['goal']}: {met})")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(tables(json.load(f)), end="")
