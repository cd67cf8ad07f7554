"""Cost measurements of the experiment, each in a process of its own so that its peak memory is its own.

python -m portllm.experiment.measure port MODEL_DIR PATCH_DIR OUT_DIR
python -m portllm.experiment.measure finetune MODEL_DIR TASK STEPS SEED
python -m portllm.experiment.measure check BASE_DIR MODEL_DIR PATCH_DIR TASK SEED

Prints one JSON line: seconds, and peak RSS above the RSS once imports are done (the job's own
memory: for fine-tuning the model, optimizer, gradients and activations; for porting, its buffers).
"""

import json
import shutil
import sys


def main(job, *args):
    import torch

    torch.set_num_threads(2)
    if job == "finetune":
        from transformers import AutoModelForCausalLM

        from portllm.experiment import data, train
    elif job == "check":
        from portllm.check import check_portability
        from portllm.experiment import data, seed_run
    else:
        import portllm
    from portllm.memory import measure

    if job == "port":
        model_dir, patch_dir, out = args

        def fn():
            portllm.port(model_dir, patch_dir, out, device="cpu", force=True, progress=False, log=None)
            shutil.rmtree(out, ignore_errors=True)
    elif job == "finetune":
        model_dir, task, steps, seed = args

        def fn():
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            train.finetune_lora(model, data.make_tokenizer(), task, int(steps), seed=int(seed))
    elif job == "check":  # what `portllm check` runs: the models and the patch from their directories
        base, model_dir, patch_dir, task, seed = args
        prompts = [p for p, _ in data.task_examples(task, seed_run.CHECK_PROMPTS, int(seed) + 4242, split="val")]

        def fn():
            check_portability(base, model_dir, patch_dir, prompts)
    else:
        raise SystemExit(f"unknown job {job}")
    res = measure(fn)
    print(json.dumps({"job": job, "seconds": res["seconds"], "peak_rss_above_baseline": res["peak_rss_above_baseline"]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
