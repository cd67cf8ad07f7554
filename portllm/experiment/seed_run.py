"""One seed of the experiment, end to end, in a process of its own:

1. pretrain θ on the synthetic corpus; evolve it into successive releases θ′₁ … θ′ₙ (continued
   pretraining on a corpus that shifts further with each);
2. fine-tune θ on each task with LoRA and with PMSS, the learning rate chosen over a small grid on the
   task's val split; save the patches Δ;
3. port every patch onto every release (``portllm.port``); re-fine-tune every release on every task with
   LoRA, its learning rate chosen the same way;
4. evaluate θ, θ+Δ, θ′, θ′+Δ and θ′ re-fine-tuned on the test split;
5. run the portability check on every (task, release, patch) point, from unlabeled val prompts, and port
   at the scale its calibration picks.

python -m portllm.experiment.seed_run WORK_DIR SEED full|quick

writes WORK_DIR/seed.json. The parent (``run``) starts one such process per seed, single-threaded: a
single thread computes the same floats on a busy CPU as on an idle one (no OpenMP threads to wait on
each other), and two seeds run side by side on two cores.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch

from portllm.experiment import data, train
from portllm.port import port

# releases: (continued-pretraining steps, corpus shift, learning rate), applied one after another.
FULL = dict(pretrain_steps=400, corpus=30000, ft_steps=100,
            releases=[(30, 0.2, 2e-4), (60, 0.4, 4e-4), (100, 0.6, 6e-4), (150, 0.8, 8e-4), (200, 1.0, 1e-3)],
            lrs={"lora": (1e-3, 3e-3, 1e-2), "pmss": (3e-3, 1e-2, 3e-2)})
QUICK = dict(pretrain_steps=200, corpus=6000, ft_steps=60, releases=[(30, 0.25, 2e-4), (120, 1.0, 1e-3)],
             lrs={"lora": (3e-3, 1e-2), "pmss": (1e-2, 3e-2)})
METHODS = ("lora", "pmss")
CHECK_PROMPTS = 64


def save_model(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def relative_change(a, b) -> float:
    num = den = 0.0
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.dim() == 2:
            num += float((q.detach() - p.detach()).double().pow(2).sum())
            den += float(p.detach().double().pow(2).sum())
    return (num / den) ** 0.5


def _port(model_dir, patch_dir, out_dir, scale=1.0) -> float:
    t0 = time.perf_counter()
    port(model_dir, patch_dir, out_dir, scale=scale, device="cpu", force=True, progress=False, log=None)
    return time.perf_counter() - t0


def run_seed(work: str, seed: int, cfg: dict, log=print) -> dict:
    from portllm import pmss

    torch.manual_seed(seed)
    tok = data.make_tokenizer()
    os.makedirs(work, exist_ok=True)
    out = {"seed": seed, "releases": [], "tasks": {}, "points": [], "port_seconds": []}

    log(f"pretraining θ ({cfg['pretrain_steps']} steps)")
    theta = train.build_model(seed)
    train.pretrain(theta, tok, data.corpus(cfg["corpus"], seed), cfg["pretrain_steps"], seed=seed)
    theta_dir = os.path.join(work, "theta")
    save_model(theta, tok, theta_dir)

    cur, total = theta, 0
    for k, (steps, shift, lr) in enumerate(cfg["releases"]):
        cur = copy.deepcopy(cur)
        train.pretrain(cur, tok, data.corpus(cfg["corpus"] // 4, seed + 100 + k, shift=shift), steps, lr=lr,
                       batch=32, seed=seed + k)
        total += steps
        path = os.path.join(work, f"evolved{k + 1}")
        save_model(cur, tok, path)
        out["releases"].append({"name": f"θ′{k + 1}", "path": path, "continued_steps": total, "shift": shift,
                                "lr": lr, "relative_weight_change": relative_change(theta, cur)})
    log(f"{len(cfg['releases'])} releases, weights moved " + ", ".join(
        f"{r['relative_weight_change']:.1%}" for r in out["releases"]) + " from θ")

    patches = {}
    for task in data.TASKS:
        row = out["tasks"][task] = {"theta": train.accuracy_batched(theta, tok, task), "releases": []}
        patches[task] = {}
        for method in METHODS:
            fn = train.finetune_lora if method == "lora" else train.finetune_pmss
            m, lr, val = train.tune(fn, theta, tok, task, cfg["lrs"][method], steps=cfg["ft_steps"], seed=seed)
            d = os.path.join(work, f"patch-{method}-{task}")
            if method == "lora":
                m.save_pretrained(d)
                merged = m.merge_and_unload()
            else:
                pmss.to_patch(m).save(d, overwrite=True)
                merged = pmss.merge(m)
            patches[task][method] = d
            row[f"theta+{method}"] = train.accuracy_batched(merged, tok, task)
            row[f"lr_{method}"], row[f"val_{method}"] = lr, {str(k): v for k, v in val.items()}
        log(f"fine-tuned θ on {task}: LoRA {row['theta+lora']:.2f} (lr {row['lr_lora']:g}), PMSS "
            f"{row['theta+pmss']:.2f} (lr {row['lr_pmss']:g}); θ alone {row['theta']:.2f}")

    for k, rel in enumerate(out["releases"]):
        evolved = load(rel["path"])
        for task in data.TASKS:
            e = {"evolved": train.accuracy_batched(evolved, tok, task)}
            for method in METHODS:
                d = os.path.join(work, f"ported-{method}-{task}-{k + 1}")
                out["port_seconds"].append(_port(rel["path"], patches[task][method], d))
                e[f"ported_{method}"] = train.accuracy_batched(load(d), tok, task)
            t0 = time.perf_counter()
            m, lr, _ = train.tune(train.finetune_lora, evolved, tok, task, cfg["lrs"]["lora"], steps=cfg["ft_steps"],
                                  seed=seed)
            e["refit_seconds"] = (time.perf_counter() - t0) / len(cfg["lrs"]["lora"])
            e["refit"], e["refit_lr"] = train.accuracy_batched(m, tok, task), lr
            out["tasks"][task]["releases"].append(e)
        log(f"{rel['name']}: ported and re-fine-tuned on every task")

    out["points"] = check_points(theta, out, patches, tok, seed, work)
    log(f"portability check on {len(out['points'])} points")
    out["patches"] = patches
    out["theta_dir"] = theta_dir
    return out


def check_points(theta, out: dict, patches: dict, tok, seed: int, work: str) -> list[dict]:
    """``portllm check`` on every (task, release, patch) point, from CHECK_PROMPTS unlabeled prompts of the
    task's val split, scoring θ+Δ's greedy answers of 8 tokens (the check's default) and of 1 token (these
    tasks' answers); the 1-token check also calibrates, and the patch is ported at the scale it picks
    (at scale 1 that is the port already measured; at 0, θ′ itself). The models are passed loaded (θ once,
    each θ′ once): the check's cost with loading is measured apart (``run``, the "check" job)."""
    from portllm.check import check_portability
    from portllm.patch import Patch

    points = []
    for k, rel in enumerate(out["releases"]):
        evolved = load(rel["path"])
        for task in data.TASKS:
            prompts = [p for p, _ in data.task_examples(task, CHECK_PROMPTS, seed + 4242, split="val")]
            row = out["tasks"][task]
            e = row["releases"][k]
            for method in METHODS:
                pt = {"seed": seed, "task": task, "release": rel["name"], "k": k, "patch": method}
                patch = Patch.load(patches[task][method])
                for tokens in (8, 1):
                    rep = check_portability(theta, evolved, patch, prompts, tokenizer=tok, max_new_tokens=tokens,
                                            calibrate=tokens == 1)
                    pt[f"score_{tokens}"], pt[f"harm_{tokens}"] = rep.score, rep.harm
                    pt[f"seconds_{tokens}"] = rep.seconds
                pt["scale"] = rep.scale
                pt["theta"], pt["theta+patch"] = row["theta"], row[f"theta+{method}"]
                pt["evolved"], pt["ported"] = e["evolved"], e[f"ported_{method}"]
                if rep.scale in (0.0, 1.0):
                    pt["calibrated"] = pt["evolved"] if rep.scale == 0.0 else pt["ported"]
                else:
                    d = os.path.join(work, f"calibrated-{method}-{task}-{k + 1}")
                    _port(rel["path"], patches[task][method], d, scale=rep.scale)
                    pt["calibrated"] = train.accuracy_batched(load(d), tok, task)
                points.append(pt)
    return points


def main(work: str, seed: str, mode: str) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    cfg = QUICK if mode == "quick" else FULL
    t0 = time.perf_counter()

    def log(msg):
        print(f"  [seed {seed}] {msg}", flush=True)

    res = run_seed(work, int(seed), cfg, log)
    res["seconds"] = time.perf_counter() - t0
    tmp = os.path.join(work, "seed.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, ensure_ascii=False)
    os.replace(tmp, os.path.join(work, "seed.json"))
    log(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
