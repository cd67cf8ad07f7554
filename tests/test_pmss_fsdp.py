"""PMSS under FSDP2 (fully_shard): two CPU processes (gloo, loopback), a tiny Llama, pmss.inject then
fully_shard on each decoder layer and the root. One spawn checks everything against one process holding
the whole model: U after an AdamW step on half the batch each equals the full-batch step, the indices
agree on both ranks, save / to_patch / merged_state_dict / load give the unsharded model's results, a
bf16 MixedPrecisionPolicy step tracks the fp32 one, and the misuses are refused by name."""

import os
import socket

import pytest
import torch

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

from hf_fixtures import llama  # noqa: E402

from portllm import pmss  # noqa: E402
from portllm.safetensors_io import SafetensorsReader  # noqa: E402


def _batch(rank):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 + rank))


def _model(u_seed=0):
    model = pmss.inject(llama(seed=0), rank=4, scale=30.0)
    with torch.no_grad():
        for i, m in enumerate(pmss.pmss_modules(model).values()):
            m.U.normal_(0, 0.05, generator=torch.Generator().manual_seed(100 * u_seed + i))
    return model


def _shard(model, mp=None, **kw):
    from torch.distributed.fsdp import fully_shard

    if mp is not None:
        kw["mp_policy"] = mp
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _step(model, tokens, opt_cls=torch.optim.AdamW, lr=1e-2):
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()


def _worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    try:
        torch.set_num_threads(1)
        model = _shard(_model())
        _step(model, _batch(rank))
        res["I"] = {n: m.I.clone() for n, m in pmss.pmss_modules(model).items()}
        res["J"] = {n: m.J.clone() for n, m in pmss.pmss_modules(model).items()}
        pmss.save(model, os.path.join(out, "pmss.safetensors"))  # every rank; rank 0 writes
        patch = pmss.to_patch(model)
        res["patch"] = {n: (m.B, m.A) for n, m in patch.items()}
        res["merged"] = pmss.merged_state_dict(model)
        ids = _batch(7)
        with torch.no_grad():
            res["logits"] = model(input_ids=ids).logits
        # load into another sharded model (different U): its outputs become the trained model's. Its
        # layers stay whole after forward (reshard_after_forward=False), as the root's always do: the
        # load must land in the shards, not in whole copies FSDP2 frees at the next reshard.
        other = _shard(_model(u_seed=5), reshard_after_forward=False)
        with torch.no_grad():
            other(input_ids=ids)
        pmss.load(other, os.path.join(out, "pmss.safetensors"))
        with torch.no_grad():
            res["loaded_logits"] = other(input_ids=ids).logits
        from portllm.pmss import sharded

        sharded.reshard_all(other)
        with torch.no_grad():
            res["loaded_logits_after_reshard"] = other(input_ids=ids).logits
        if rank == 0:  # a file whose I repeats an index, and a file only rank 0 has
            from safetensors.torch import load_file, save_file
            from safetensors import safe_open

            t = load_file(os.path.join(out, "pmss.safetensors"))
            with safe_open(os.path.join(out, "pmss.safetensors"), "pt") as f:
                meta = f.metadata()
            k = next(k for k in t if k.endswith(".I"))
            t[k][1] = t[k][0]
            save_file(t, os.path.join(out, "bad.safetensors"), metadata=meta)
            save_file(load_file(os.path.join(out, "pmss.safetensors")), os.path.join(out, "only0.safetensors"),
                      metadata=meta)
        dist.barrier()
        # refusals, raised on every rank alike
        errs = {}
        for what, fn in (("merge", lambda: pmss.merge(model)),
                         ("inject", lambda: pmss.inject(model, rank=4, target_modules=["lm_head"])),
                         ("save", lambda: pmss.save(model, os.path.join(out, "pmss.safetensors"))),
                         ("repeated index", lambda: pmss.load(other, os.path.join(out, "bad.safetensors"))),
                         ("missing on one rank", lambda: pmss.load(
                             other, os.path.join(out, "only0.safetensors" if rank == 0 else "nowhere.safetensors"))),
                         ("forward", lambda: next(iter(pmss.pmss_modules(model).values()))(torch.randn(1, 64)))):
            try:
                fn()
                errs[what] = None
            except Exception as e:  # noqa: BLE001
                errs[what] = f"{type(e).__name__}: {e}"
        res["errors"] = errs
        # bf16 parameters for compute, fp32 gradients reduced: one SGD step
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        half = _shard(_model(), mp)
        _step(half, _batch(rank), torch.optim.SGD, lr=1.0)
        res["mp_U"] = {n: m.U.full_tensor().detach().clone() for n, m in pmss.pmss_modules(half).items()}
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    import torch.multiprocessing as mp

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available here")
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _reference():
    """One process, the whole model, the full batch (both ranks' halves): FSDP2 averages the ranks'
    gradients, and each rank's loss is the mean over the same number of tokens."""
    model = _model()
    tokens = torch.cat([_batch(0), _batch(1)])
    _step(model, tokens)
    return model


def test_fsdp2_step_equals_one_process_and_indices_agree(spawned):
    out, (r0, r1) = spawned
    ref = _reference()
    mods = pmss.pmss_modules(ref)
    assert set(r0["I"]) == set(mods) and len(mods) == 14
    for n, m in mods.items():  # the skeleton: the same on both ranks, and the unsharded model's
        assert torch.equal(r0["I"][n], r1["I"][n]) and torch.equal(r0["I"][n], m.I)
        assert torch.equal(r0["J"][n], r1["J"][n]) and torch.equal(r0["J"][n], m.J)
    with SafetensorsReader(str(out / "pmss.safetensors")) as rd:
        for n, m in mods.items():
            torch.testing.assert_close(rd[f"{n}.U"], m.U.detach(), rtol=1e-4, atol=2e-6)
            assert torch.equal(rd[f"{n}.I"], m.I)


def test_fsdp2_save_patch_merge_load_match_unsharded(spawned):
    out, (r0, r1) = spawned
    ref = _reference()
    patch = pmss.to_patch(ref)
    for n, (B, A) in r0["patch"].items():
        assert torch.equal(A, patch[n].A)  # rows of W: gathered exactly
        torch.testing.assert_close(B, patch[n].B, rtol=1e-4, atol=1e-6)
        assert torch.equal(B, r1["patch"][n][0])  # every rank gets the same patch
    merged_ref = pmss.merge(ref).state_dict()
    assert r1["merged"] == {}  # rank0_only
    assert set(r0["merged"]) == set(merged_ref)
    for k, v in merged_ref.items():
        torch.testing.assert_close(r0["merged"][k], v, rtol=1e-4, atol=1e-6)
    # the file the sharded save wrote loads into an unsharded model like any other
    plain = pmss.load(llama(seed=0), str(out / "pmss.safetensors"))
    with torch.no_grad():
        logits = plain(input_ids=_batch(7)).logits
    torch.testing.assert_close(r0["logits"], logits, rtol=1e-4, atol=1e-5)
    for r in (r0, r1):
        assert torch.equal(r["loaded_logits"], r["logits"])
        assert torch.equal(r["loaded_logits_after_reshard"], r["logits"])


def test_fsdp2_misuse_is_refused_by_name(spawned):
    _, (r0, r1) = spawned
    for errs in (r0["errors"], r1["errors"]):
        assert "sharded by FSDP2" in errs["merge"] and "merged_state_dict" in errs["merge"]
        assert "already sharded by FSDP2" in errs["inject"] and "before fully_shard" in errs["inject"]
        assert errs["save"].startswith("FileExistsError") and "pmss.safetensors exists" in errs["save"]
        assert "a shard (an FSDP2 DTensor)" in errs["forward"] and "fully_shard" in errs["forward"]
        assert errs["repeated index"].startswith("PMSSLoadError") and "I has repeated indices" in errs["repeated index"]
        # rank 1 cannot read its file: both ranks raise its error (rank 0 does not wait in a gather)
        assert "nowhere.safetensors" in errs["missing on one rank"]


def test_fsdp2_mixed_precision_step_tracks_fp32(spawned):
    """bf16 compute, fp32 reduction, SGD: U's update is the fp32 one to bf16 accuracy."""
    _, (r0, r1) = spawned
    ref = _model()
    _step(ref, torch.cat([_batch(0), _batch(1)]), torch.optim.SGD, lr=1.0)
    start = _model()
    for n, m in pmss.pmss_modules(ref).items():
        U0 = pmss.pmss_modules(start)[n].U.detach()
        want, got = m.U.detach() - U0, r0["mp_U"][n] - U0
        assert torch.equal(r0["mp_U"][n], r1["mp_U"][n])
        assert float((got - want).norm()) <= 0.05 * float(want.norm()) + 1e-6, n
