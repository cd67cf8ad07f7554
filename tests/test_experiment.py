"""The main job: the quick portability experiment, end to end, checks what it claims."""

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from portllm import cli  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--quick", "--out", str(out), "--seed", "0", "--seeds", "2"]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


@pytest.mark.slow
def test_quick_pipeline_outputs(quick_run):
    out, res = quick_run
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert "re-fine-tuned" in (out / "table.md").read_text()
    assert set(res["tasks"]) == {"topic", "facts", "arith"}
    assert len(res["releases"]) == 2 and res["seeds"] == [0, 1]
    rel = res["releases"]
    assert rel[0]["relative_weight_change"]["mean"] < rel[1]["relative_weight_change"]["mean"]
    assert rel[0]["relative_weight_change"]["n"] == 2
    ck = res["check"]
    assert ck["points"] == 2 * 3 * 2 * 2 and ck["seeds"] == 2  # seeds × tasks × releases × patch types
    for s in res["per_seed"]:  # every cell of every seed, and the lr chosen from the grid
        for task, row in s["tasks"].items():
            assert row["lr_lora"] in res["settings"]["lrs"]["lora"] and len(row["releases"]) == 2
    assert "Spearman" in (out / "table.md").read_text()


@pytest.mark.slow
def test_ported_patches_beat_evolved_alone_where_finetuning_helped(quick_run):
    """The claim: where the fine-tune beat θ, the LoRA patch ported onto the mildest release beats
    that release alone."""
    _, res = quick_run
    helped = [t for t, row in res["tasks"].items() if row["theta+lora"]["mean"] > row["theta"]["mean"] + 0.1]
    assert helped, "the fine-tunes must have learned something"
    for task in helped:
        e = res["tasks"][task]["releases"][0]
        assert e["ported_lora"]["mean"] > e["evolved"]["mean"], (task, e)


@pytest.mark.slow
def test_porting_costs_far_less_memory_than_refitting(quick_run):
    _, res = quick_run
    c = res["cost"]
    assert c["port"]["peak_rss_above_baseline"] * 10 <= c["refit"]["peak_rss_above_baseline"], c


@pytest.mark.slow
def test_user_checkpoint_mode(quick_run, tmp_path):
    out, res = quick_run
    work = out / "work" / "seed-0"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"task": "arith", "prompt": f"{a} plus {b} equals", "answer": str(a + b)})
                               for a in range(4) for b in range(4)))
    user_out = tmp_path / "user"
    assert cli.main(["demo", "--base", str(work / "theta"), "--evolved", str(work / "evolved1"),
                     "--patch", str(work / "patch-lora-arith"), "--tasks", str(tasks), "--out", str(user_out)]) == 0
    got = json.loads((user_out / "results.json").read_text())["tasks"]["arith"]
    assert set(got) == {"theta", "theta+patch", "evolved", "evolved+patch (ported)"}
    assert os.path.exists(user_out / "accuracy.png")


@pytest.mark.slow
def test_fp8_release(quick_run):
    """θ′1 is also released in block-FP8; the LoRA patch ported onto it with each rounding is measured,
    and the retained fraction is the port's report (stochastic keeps about all of it in expectation)."""
    out, res = quick_run
    f8 = res["fp8"]
    assert f8["release"] == "θ′1" and set(f8["tasks"]) == set(res["tasks"])
    for e in f8["tasks"].values():
        for key in ("evolved_fp8", "ported_nearest", "ported_stochastic"):
            assert 0.0 <= e[key] <= 1.0
        assert 0.0 < e["retained_nearest"] <= 1.5 and 0.5 < e["retained_stochastic"] < 1.5
    assert "FP8+Δ LoRA, stochastic" in (out / "table.md").read_text()


def test_task_splits_are_disjoint():
    """Train, val and test prompts never overlap; an arith test sum is one no training prompt holds, in
    any wording."""
    from portllm.experiment import data

    for task in data.TASKS:
        sets = {sp: {p for p, _ in data.task_examples(task, 600, 3, split=sp)} for sp in data.SPLITS}
        assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
        assert len(sets["test"]) > 50, task
    pair = lambda p: tuple(w for w in p.split() if w.isdigit())  # noqa: E731
    train = {pair(p) for p, _ in data.task_examples("arith", 2000, 1, split="train")}
    assert not train & {pair(p) for p, _ in data.task_examples("arith", 500, 2, split="test")}
    with pytest.raises(ValueError, match="unknown split"):
        data.task_examples("arith", 1, 0, split="dev")


def _seed(seed, theta, patched, evolved, ported, score):
    row = {"theta": theta, "theta+lora": patched, "theta+pmss": patched, "lr_lora": 1e-3, "lr_pmss": 1e-2,
           "releases": [{"evolved": evolved, "ported_lora": ported, "ported_pmss": ported, "refit": 0.9}]}
    pts = [{"seed": seed, "task": "t", "release": "θ′1", "k": 0, "patch": m, "theta": theta, "theta+patch": patched,
            "evolved": evolved, "ported": ported, "calibrated": max(ported, evolved), "score_8": score, "harm_8": score < 0,
            "score_1": score, "harm_1": score < 0, "seconds_8": 1.0, "seconds_1": 1.0, "scale": 1.0}
           for m in ("lora", "pmss")]
    return {"seed": seed, "tasks": {"t": row}, "points": pts, "port_seconds": [0.5],
            "releases": [{"name": "θ′1", "continued_steps": 10, "shift": 0.5, "relative_weight_change": 0.1}]}


def test_aggregate_figures():
    """Retention per cell and in aggregate (gain-weighted), harm, the check's ρ / precision / recall, from
    numbers worked by hand."""
    from portllm.experiment import aggregate

    seeds = [_seed(0, 0.2, 0.8, 0.3, 0.6, 0.5),    # R = 0.3 / 0.6 = 0.5
             _seed(1, 0.2, 0.4, 0.3, 0.5, 1.0),    # R = 0.2 / 0.2 = 1.0
             _seed(2, 0.5, 0.55, 0.6, 0.4, -0.2)]  # gain 0.05 < 0.1: no R; harmful
    out = aggregate.summarize(seeds)
    c = out["tasks"]["t"]["releases"][0]
    assert c["R_lora"]["n"] == 2 and c["R_lora"]["mean"] == pytest.approx(0.75)
    assert c["R_lora"]["sd"] == pytest.approx(0.5 ** 0.5 / 2)
    assert out["retention"]["lora"][0] == pytest.approx((0.3 + 0.2) / (0.6 + 0.2))
    assert c["harmful_lora"] == 1 and len(out["harmful"]) == 2 and out["harmful"][0]["seed"] == 2
    ck = out["check"]
    assert ck["points"] == 6 and ck["tokens_1"]["spearman"] == pytest.approx(1.0)
    assert ck["tokens_1"]["precision"] == 1.0 and ck["tokens_1"]["recall"] == 1.0
    assert ck["calibration"]["fixed"] == 2 and ck["calibration"]["harmful"] == 2
    assert aggregate.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_seeds_run_single_threaded():
    """Each seed's process runs one thread (the same floats on a busy CPU; no OpenMP threads spinning)."""
    from portllm.experiment import run

    env = run._seed_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
