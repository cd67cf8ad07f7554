"""PMSS through the HF Trainer's own saving: save_model, a reload with from_pretrained (the base
weights, never random ones) and pmss.load (the fine-tune), resume_from_checkpoint continuing
exactly, and portllm's own tools refusing the directory with a message that names pmss.load."""

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_fixtures import llama  # noqa: E402

from portllm import cli, pmss  # noqa: E402


def _data(n=16, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _trainer(model, out, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=3e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
                             disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, train_dataset=_data())


def _injected():
    return pmss.inject(llama(seed=0), rank=4).train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmss-trainer")
    model = _injected()
    trainer = _trainer(model, root / "run")
    trainer.train()
    trainer.save_model(str(root / "final"))
    us = {n: m.U.detach().clone() for n, m in pmss.pmss_modules(model).items()}
    assert any(float(u.abs().max()) > 0 for u in us.values()), "training moved U"
    return root, model.eval(), us


def test_from_pretrained_gives_the_base_weights_and_pmss_load_the_fine_tune(trained):
    from transformers import LlamaForCausalLM

    root, model, _ = trained
    base = llama(seed=0)
    reloaded = LlamaForCausalLM.from_pretrained(str(root / "final"))
    for n, p in base.state_dict().items():
        assert torch.equal(reloaded.state_dict()[n], p), f"{n} is not the base weight (missing, random?)"
    pmss.load(reloaded, str(root / "final"))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, plain = model(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.equal(got, want)
    assert (want - plain).abs().max() > 1e-3


def test_resume_from_checkpoint_continues_exactly(trained, tmp_path):
    root, _, us = trained
    model = _injected()
    _trainer(model, tmp_path / "resumed").train(resume_from_checkpoint=str(root / "run" / "checkpoint-3"))
    for n, m in pmss.pmss_modules(model).items():
        torch.testing.assert_close(m.U.detach(), us[n], atol=1e-6, rtol=1e-5, msg=lambda s: f"{n}: {s}")


def test_portllm_refuses_a_pmss_checkpoint_naming_pmss_load(trained, capsys, tmp_path):
    root, _, _ = trained
    from safety_fixtures import make_patch

    patch = make_patch(shape=(64, 64), modules=["model.layers.0.self_attn.q_proj"])
    patch.save(str(tmp_path / "patch"))
    code = cli.main(["port", "--model", str(root / "final"), "--patch", str(tmp_path / "patch"), "--out",
                     str(tmp_path / "o"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "PMSS fine-tuning keys" in err and "pmss.load" in err and "\n" not in err, err
    assert not os.path.exists(tmp_path / "o")


def test_pmss_load_refuses_other_base_weights(trained):
    root, _, _ = trained
    with pytest.raises(pmss.PMSSLoadError, match="not the base weights"):
        pmss.load(llama(seed=5), str(root / "final"))
