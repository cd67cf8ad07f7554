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
    assert cli.main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


@pytest.mark.slow
def test_quick_pipeline_outputs(quick_run):
    out, res = quick_run
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert "re-fine-tuned" in (out / "table.md").read_text()
    assert set(res["tasks"]) == {"topic", "facts", "arith"}
    assert len(res["releases"]) == 2
    rel = res["releases"]
    assert rel[0]["relative_weight_change"] < rel[1]["relative_weight_change"]


@pytest.mark.slow
def test_ported_patches_beat_evolved_alone_where_finetuning_helped(quick_run):
    """The claim: where the fine-tune beat θ, the LoRA patch ported onto the mildest release beats
    that release alone."""
    _, res = quick_run
    helped = [t for t, row in res["tasks"].items() if row["theta+lora"] > row["theta"] + 0.1]
    assert helped, "the fine-tunes must have learned something"
    for task in helped:
        e = res["tasks"][task]["releases"][0]
        assert e["ported_lora"] > e["evolved"], (task, e)


@pytest.mark.slow
def test_porting_costs_far_less_memory_than_refitting(quick_run):
    _, res = quick_run
    c = res["cost"]
    assert c["port"]["peak_rss_above_baseline"] * 10 <= c["refit"]["peak_rss_above_baseline"], c


@pytest.mark.slow
def test_user_checkpoint_mode(quick_run, tmp_path):
    out, res = quick_run
    work = out / "work"
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
