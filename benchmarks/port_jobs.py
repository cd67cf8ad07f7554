"""The jobs of bench_port.py, each run in a process of its own so that its peak memory is its own.

Usage: python benchmarks/port_jobs.py JOB CHECKPOINT PATCH OUT [DEVICE]
Prints one JSON line: seconds (the job alone, imports and untimed set-up excluded), peak RSS above
the process's RSS just before the job (imports done), and for CUDA the peak GPU memory. The
``stages`` job times each stage of the port's stream on its own instead (``stages``: seconds each).
"""

import json
import os
import shutil
import sys
import time


def copy_and_fsync(ckpt: str, out: str):
    """The port's floor: every file of the checkpoint copied (``shutil.copyfile``: the kernel's copy) and
    fsynced, then the directory."""
    os.makedirs(out)
    for name in sorted(os.listdir(ckpt)):
        dst = os.path.join(out, name)
        shutil.copyfile(os.path.join(ckpt, name), dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stages(ckpt: str, patch_dir: str, out: str, device: str) -> dict:
    """Each stage of the port's stream alone, over the same bytes: reading every tensor in the port's
    chunks; merging the patched ones (chunks read again, untimed); writing and fsyncing as many bytes."""
    import torch

    from portllm import port_stream
    from portllm.checkpoint import Checkpoint, tensor_target, weight_key
    from portllm.direct_file import SequentialFile
    from portllm.merge import merge_into
    from portllm.patch import Patch

    patch = Patch.load(patch_dir)
    targets = {tensor_target(weight_key(n))[0]: n for n in patch}
    chunk = port_stream.CHUNK_BYTES
    buf = torch.empty(chunk, dtype=torch.uint8)
    res = {"read": 0.0, "merge": 0.0, "write+fsync": 0.0}
    with Checkpoint(ckpt) as c:
        keys = [(f, k) for f in c.files for k in c.reader(f).tensors]
        total = sum(c.info(k).nbytes for _, k in keys)
        t0 = time.perf_counter()
        for f, k in keys:
            n = c.info(k).nbytes
            for off in range(0, n, chunk):
                c.reader(f).read_into(k, off, buf[:min(chunk, n - off)])
        res["read"] = time.perf_counter() - t0
        for f, k in keys:
            if k not in targets:
                continue
            info = c.info(k)
            rows = max(1, chunk // (info.nbytes // info.shape[0]))
            m = patch[targets[k]]
            for lo in range(0, info.shape[0], rows):
                hi = min(info.shape[0], lo + rows)
                raw = buf[:(hi - lo) * (info.nbytes // info.shape[0])]
                c.reader(f).read_into(k, lo * (info.nbytes // info.shape[0]), raw)
                W = raw.view(info.dtype).view(hi - lo, *info.shape[1:])
                t0 = time.perf_counter()
                merge_into(W, [(port_stream._rows_of(m, lo, hi), 1.0)], scratch=True, factors_checked=True)
                res["merge"] += time.perf_counter() - t0
    os.makedirs(out)
    buf.random_(0, 256)
    t0 = time.perf_counter()
    f = SequentialFile(os.path.join(out, "bytes"), total)
    for off in range(0, total, chunk):
        f.append(buf[:min(chunk, total - off)])
    f.close()
    res["write+fsync"] = time.perf_counter() - t0
    return {"stages": res, "bytes": total}


def main(job, ckpt, patch_dir, out, device="cpu"):
    import torch

    import portllm
    from portllm.memory import measure

    if job == "stages":
        print(json.dumps(dict(job=job, **stages(ckpt, patch_dir, out, device))))
        return
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
    report = {}

    def fn():
        if job == "copy":
            copy_and_fsync(ckpt, out)
        elif job == "port":
            report["job_seconds"] = portllm.port(ckpt, patch_dir, out, device=device, progress=False,
                                                 log=None).seconds
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
    res = dict(job=job, **measure(fn), **report)
    if device == "cuda":
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)  # skip tearing down a multi-GB model
