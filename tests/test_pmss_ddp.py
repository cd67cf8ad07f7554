"""PMSS under torch DDP: two CPU processes (gloo, loopback), gradients averaged across ranks."""

import os
import socket

import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures import llama  # noqa: E402

from portllm import pmss  # noqa: E402


def _batch(rank):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 + rank))


def _model():
    model = pmss.inject(llama(seed=0), rank=4, scale=30.0)
    with torch.no_grad():
        for i, m in enumerate(pmss.pmss_modules(model).values()):
            m.U.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return model


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ddp = DDP(_model())
        tokens = _batch(rank)
        ddp(input_ids=tokens, labels=tokens).loss.backward()
        grads = {n: p.grad for n, p in ddp.module.named_parameters() if p.requires_grad}
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (one aborted once: "terminate called")
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    g0 = torch.load(tmp_path / "grads0.pt")
    g1 = torch.load(tmp_path / "grads1.pt")
    # single-process reference: the mean of the two ranks' gradients
    expected = {}
    for rank in range(2):
        model = _model()
        tokens = _batch(rank)
        model(input_ids=tokens, labels=tokens).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                expected[n] = expected.get(n, 0) + p.grad / 2
    assert set(g0) == set(expected) and len(g0) == 14
    for n in expected:
        torch.testing.assert_close(g0[n], g1[n])
        torch.testing.assert_close(g0[n], expected[n], rtol=1e-4, atol=1e-6)
