"""portllm.serve under threads and bad values: routing is per thread, a route block pins the
patches it names (unload or replacement refused), loads into free slots never disturb a forward,
and every entry point refuses NaN/Inf factors and scales, naming the patch and module."""

import threading

import pytest
import torch

import portllm
from portllm import serve
from portllm.patch import Patch


def _patch(seed, r=3, scale=0.5, out=24, inp=32):
    g = torch.Generator().manual_seed(seed)
    return Patch({"0": portllm.PatchModule(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g), scale)})


def _net(patches, **kw):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    net = torch.nn.Sequential(lin)
    serve.attach(net, patches, **kw)
    return net, lin


def _expected(lin, x, p):
    m = p["0"]
    with torch.no_grad():
        return lin(x) + m.scale * (x @ m.A.t()) @ m.B.t()


def test_two_threads_route_different_patches_at_once():
    pa, pb = _patch(1), _patch(2, r=2, scale=2.0)
    net, lin = _net({"a": pa, "b": pb})
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    want = {"a": _expected(lin, x, pa), "b": _expected(lin, x, pb)}
    both_inside = threading.Barrier(2)
    errors = []

    def worker(name):
        try:
            with torch.no_grad(), serve.route(net, name):
                both_inside.wait(timeout=30)  # both route blocks active from here on
                for _ in range(200):
                    got = net(x)
                    if not torch.allclose(got, want[name], atol=1e-5, rtol=1e-5):
                        errors.append(f"thread {name}: got another thread's routing")
                        return
                both_inside.wait(timeout=30)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"thread {name}: {e!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with torch.no_grad():
        assert torch.equal(net(x), lin(x)), "outside any block (this thread): the base model"


def test_loads_into_free_slots_never_disturb_a_running_forward():
    pa = _patch(1)
    net, lin = _net({"a": pa}, max_patches=3, max_rank=4)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    want = _expected(lin, x, pa)
    stop = threading.Event()
    errors = []

    def churn():
        i = 0
        while not stop.is_set():
            try:
                serve.load(net, "tmp", _patch(10 + i % 5, r=4))
                serve.unload(net, "tmp")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        with torch.no_grad(), serve.route(net, ["a", "a", None, "a", None]):
            for _ in range(300):
                got = net(x)
                rows = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
                assert torch.allclose(got[rows], want[rows], atol=1e-5, rtol=1e-5)
                with torch.no_grad():
                    assert torch.equal(got[~rows], lin(x)[~rows])
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_unload_of_a_routed_patch_is_refused():
    """Unloading a name an active route uses would give its rows the base output (and, once the
    slot is reused, another user's patch): refused. This thread's own hot swap stays allowed."""
    pa, pb = _patch(1), _patch(2)
    net, lin = _net({"a": pa, "b": pb}, max_patches=3)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), serve.route(net, ["a", None]):
        with pytest.raises(serve.ServeError, match="cannot unload patch 'a': 1 active route block"):
            serve.unload(net, "a")
        with pytest.raises(serve.ServeError, match="cannot detach"):
            serve.detach(net)
        serve.unload(net, "b")  # not routed here: fine
        got = net(x)
        torch.testing.assert_close(got[0], _expected(lin, x, pa)[0], atol=1e-5, rtol=1e-5)
        serve.load(net, "a", pb)  # this thread's own hot swap, between its forwards
        got = net(x)
        torch.testing.assert_close(got[0], _expected(lin, x, pb)[0], atol=1e-5, rtol=1e-5)
    serve.unload(net, "a")  # the block has ended
    assert serve.loaded(net) == {}


def test_a_block_in_another_thread_pins_its_patches():
    net, _ = _net({"a": _patch(1)})
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with torch.no_grad(), serve.route(net, "a"):
            inside.set()
            leave.wait(timeout=30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(timeout=30)
        with pytest.raises(serve.ServeError, match="in this thread or another"):
            serve.unload(net, "a")
        with pytest.raises(serve.ServeError, match="cannot replace patch 'a': 1 active route block.* another thread"):
            serve.load(net, "a", _patch(3))
    finally:
        leave.set()
        t.join()
    serve.unload(net, "a")


@pytest.mark.parametrize("what", ["nan-B", "inf-A", "nan-scale", "inf-scale"])
@pytest.mark.parametrize("entry", ["attach", "load"])
def test_non_finite_patches_are_refused_on_every_entry(what, entry):
    p = _patch(1)
    m = p["0"]
    if what == "nan-B":
        m.B[2, 1] = float("nan")
    elif what == "inf-A":
        m.A[0, 7] = float("inf")
    else:
        p = Patch({"0": portllm.PatchModule(m.B, m.A, float("nan") if what == "nan-scale" else float("inf"))})
    if entry == "attach":
        lin = torch.nn.Linear(32, 24)
        net = torch.nn.Sequential(lin)
        with pytest.raises(serve.ServeError, match=r"patch 'bad': module 0: .*(NaN|not finite)"):
            serve.attach(net, {"bad": p})
        assert isinstance(net[0], torch.nn.Linear) and not isinstance(net[0], serve.PatchedLinear)
    else:
        net, _ = _net({"a": _patch(2)}, max_patches=2)
        before = net[0].lora_A.clone()
        with pytest.raises(serve.ServeError, match=r"patch 'bad': module 0: .*(NaN|not finite)"):
            serve.load(net, "bad", p)
        assert torch.equal(net[0].lora_A, before) and serve.loaded(net) == {"a": 0}


def test_a_thread_started_in_a_block_routes_with_the_decorator():
    """route is per thread: a worker started inside a block (a streamer's generate thread) runs the
    base model, unless it runs inside route itself; route is a decorator for that."""
    pa = _patch(1)
    net, lin = _net({"a": pa})
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(6))
    got = {}

    def forward(key):
        with torch.no_grad():
            got[key] = net(x)

    with serve.route(net, "a"):
        plain = threading.Thread(target=forward, args=("plain",))
        routed = threading.Thread(target=serve.route(net, "a")(forward), args=("routed",))
        for t in (plain, routed):
            t.start()
            t.join()
    with torch.no_grad():
        assert torch.equal(got["plain"], lin(x))
    torch.testing.assert_close(got["routed"], _expected(lin, x, pa), atol=1e-5, rtol=1e-5)
    serve.unload(net, "a")  # every pin released


def test_a_block_left_from_another_thread_releases_its_pins():
    net, _ = _net({"a": _patch(1)})
    cm = serve.route(net, "a")
    t = threading.Thread(target=cm.__enter__)
    t.start()
    t.join()
    cm.__exit__(None, None, None)  # (a generator holding the block, finalised elsewhere)
    serve.unload(net, "a")


def test_an_attached_model_can_be_copied():
    import copy

    pa = _patch(1)
    net, lin = _net({"a": pa})
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    with serve.route(net, "a"):
        twin = copy.deepcopy(net)  # made inside a block: the copy has no routing of its own
        with torch.no_grad():
            assert torch.equal(twin(x), lin(x))
    with torch.no_grad(), serve.route(twin, "a"):
        torch.testing.assert_close(twin(x), _expected(lin, x, pa), atol=1e-5, rtol=1e-5)
    serve.unload(twin, "a")
    assert serve.loaded(net) == {"a": 0}


def test_expansion_only_for_batch_token_feature_inputs():
    """A batch k times the names expands (generate's beams) only for [batch, tokens, features]
    inputs and one k per block: an expert's gathered 2-D tokens are refused, not mis-routed."""
    pa, pb = _patch(1), _patch(2)
    net, lin = _net({"a": pa, "b": pb})
    x3 = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), serve.route(net, ["a", "b"]):
        got = net(x3)
        with pytest.raises(ValueError, match="4 rows but names has 2"):
            net(x3.reshape(4, 3 * 32)[:, :32])
        with pytest.raises(ValueError, match="the same k for the whole block"):
            net(torch.randn(6, 3, 32))
    want = torch.cat([_expected(lin, x3[:2], pa), _expected(lin, x3[2:], pb)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
