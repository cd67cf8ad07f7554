"""The jobs of bench_port.py, each run in a process of its own so that its peak memory is its own.

Usage: python benchmarks/port_jobs.py JOB CHECKPOINT PATCH OUT [DEVICE]
Prints one JSON line: seconds (the job alone, imports and untimed set-up excluded), peak RSS above
the process's RSS just before the job (imports done), and for CUDA the peak GPU memory.
"""

import json
import os
import shutil
import sys


def main(job, ckpt, patch_dir, out, device="cpu"):
    import torch

    import portllm
    from portllm.memory import measure

    if job in ("peft", "peft_merge", "apply"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    setup = None
    if job in ("apply", "peft_merge"):
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
        # from_pretrained may leave weights backed by the file's memory map, and the first write to
        # each page then costs a page fault and a copy: materialise them, as a model in use is.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        setup = (model, portllm.Patch.load(patch_dir)) if job == "apply" else PeftModel.from_pretrained(model, patch_dir)
    def fn():
        if job == "copy":
            shutil.copytree(ckpt, out)
        elif job == "port":
            portllm.port(ckpt, patch_dir, out, device=device, progress=False, log=None)
        elif job == "peft":
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
            PeftModel.from_pretrained(model, patch_dir).merge_and_unload().save_pretrained(out)
        elif job == "apply":
            portllm.apply_patch(*setup)
        elif job == "peft_merge":
            setup.merge_and_unload()

    if job not in ("copy", "port", "peft", "apply", "peft_merge"):
        raise SystemExit(f"unknown job {job}")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = dict(job=job, **measure(fn))
    if device == "cuda":
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)  # skip tearing down a multi-GB model
