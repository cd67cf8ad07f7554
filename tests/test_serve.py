"""portllm.serve on a small transformers Llama: mixed batches against PEFT's, hot-swap, errors."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_fixtures import TARGETS, llama  # noqa: E402

import portllm  # noqa: E402
from portllm import serve  # noqa: E402
from portllm.patch import Patch  # noqa: E402

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def peft_adapter(base, out_dir, r, seed, targets=TARGETS):
    """A LoRA adapter with random (non-zero) A and B, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # make the update large enough to see: about 10% of the weights
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = llama(seed=0)
    return {"a": peft_adapter(base, str(root / "a"), 4, 1),
            "b": peft_adapter(base, str(root / "b"), 8, 2, targets=["q_proj", "v_proj", "down_proj"])}


def peft_mixed(dtype, adapters, names, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(llama(seed=0).to(dtype), adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_batch_matches_peft(adapters, dtype, backend, monkeypatch):
    if portllm.ops.backend_unavailable_reason(backend, "cpu", "lora_shrink"):
        pytest.skip(portllm.ops.backend_unavailable_reason(backend, "cpu", "lora_shrink"))
    monkeypatch.setenv("PORTLLM_BACKEND", backend)
    names = ["a", None, "b", "a", "b"]
    ids = torch.randint(0, 128, (len(names), 9), generator=torch.Generator().manual_seed(0))
    expected = peft_mixed(dtype, adapters, names, ids)
    model = llama(seed=0).to(dtype)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    serve.attach(model, adapters, max_patches=4)
    assert sum(isinstance(m, serve.PatchedLinear) for m in model.modules()) == 2 * len(TARGETS)
    with torch.no_grad(), serve.route(model, names):
        got = model(input_ids=ids).logits
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    assert torch.equal(got[1], base[1]), "a row routed to no patch must be the base model's, bit for bit"
    for i in (0, 2):
        assert (got[i] - base[i]).abs().max() > 10 * atol, "the patch must change the logits"
    with torch.no_grad():  # outside route: the base model
        assert torch.equal(model(input_ids=ids).logits, base)


def test_generate_routes_every_step(adapters):
    model = llama(seed=0)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    serve.attach(model, adapters)
    with torch.no_grad(), serve.route(model, ["a", "b", None]):
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    solo = []
    for name in ("a", "b", None):
        with torch.no_grad(), serve.route(model, name):
            solo.append(model.generate(input_ids=ids[:1] if name == "a" else ids[1:2] if name == "b" else ids[2:],
                                       max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert torch.equal(out, torch.cat(solo))


def test_single_patch_equals_merged_weights(adapters):
    """Routing every row to a patch computes the same function as merging it."""
    model = llama(seed=0)
    merged = portllm.apply_patch(llama(seed=0), Patch.load(adapters["b"]))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    serve.attach(model, {"b": adapters["b"]})
    with torch.no_grad(), serve.route(model, "b"):
        got = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(got, merged(input_ids=ids).logits, atol=2e-5, rtol=1e-4)


def test_load_unload_detach(adapters):
    model = llama(seed=0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    serve.attach(model, {"a": adapters["a"]}, max_patches=2, max_rank=8)
    assert set(model.state_dict()) == set(sd), "the state dict keeps the base model's keys"
    serve.load(model, "b", adapters["b"])
    assert serve.loaded(model) == {"a": 0, "b": 1}
    with torch.no_grad(), serve.route(model, ["b", "a"]):
        first = model(input_ids=ids).logits
    with pytest.raises(serve.ServeError, match="all max_patches=2 slots"):
        serve.load(model, "c", adapters["a"])
    serve.unload(model, "a")
    with pytest.raises(serve.ServeError, match="no patch named 'a'"):
        with serve.route(model, ["b", "a"]):
            pass
    serve.load(model, "c", adapters["a"])  # into a's old slot
    with torch.no_grad(), serve.route(model, ["b", "c"]):
        assert torch.equal(model(input_ids=ids).logits, first)
    serve.load(model, "c", Patch.load(adapters["b"]))  # replace in place
    with torch.no_grad(), serve.route(model, ["b", "c"]):
        again = model(input_ids=ids).logits
    with torch.no_grad(), serve.route(model, ["b", "b"]):  # (grouped differently: equal up to fp32 rounding)
        torch.testing.assert_close(model(input_ids=ids).logits, again, atol=1e-5, rtol=1e-5)
    assert torch.equal(again[0], first[0]) and not torch.allclose(again[1], first[1])
    serve.detach(model)
    assert not any(isinstance(m, serve.PatchedLinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), f"{k} changed"


def test_errors_name_the_thing_at_fault(adapters, tmp_path):
    model = llama(seed=0)
    with pytest.raises(serve.ServeError, match="rank 8, above max_rank=4"):
        serve.attach(model, adapters, max_rank=4)
    assert not any(isinstance(m, serve.PatchedLinear) for m in model.modules()), "a refused attach changes nothing"
    with pytest.raises(serve.ServeError, match="2 patches but max_patches=1"):
        serve.attach(model, adapters, max_patches=1)
    serve.attach(model, {"b": adapters["b"]})  # only q, v, down are patched layers
    with pytest.raises(serve.ServeError, match="patch 'a': module model.layers.0.* is not one of the patched layers"):
        serve.load(model, "a", adapters["a"])
    wide = Patch.load(adapters["b"])
    name = "model.layers.0.self_attn.q_proj"
    m = wide.modules[name]
    wide.modules[name] = type(m)(torch.zeros(m.B.shape[0] + 1, m.rank), m.A, m.scale)
    with pytest.raises(serve.ServeError, match=f"module {name} needs a weight of shape"):
        serve.load(model, "w", wide)
    with pytest.raises(serve.ServeError, match="no patch named 'zed'"):
        with serve.route(model, ["b", "zed"]):
            pass
    ids = torch.zeros(3, 4, dtype=torch.long)
    with torch.no_grad(), serve.route(model, ["b", None]):
        with pytest.raises(ValueError, match="the batch has 3 rows but names has 2 entries"):
            model(input_ids=ids)
    with serve.route(model, ["b", None, "b"]):
        with pytest.raises(RuntimeError, match="inference"):
            model(input_ids=ids)
    with pytest.raises(serve.ServeError, match="already has patched layers"):
        serve.attach(model, adapters)


def test_hot_swap_does_not_recompile(adapters):
    """Loading into a free slot or replacing a patch copies into buffers: no recompilation."""
    import torch._dynamo

    torch._dynamo.reset()
    lin = torch.nn.Linear(64, 48)
    net = torch.nn.Sequential(lin)
    g = torch.Generator().manual_seed(4)
    pa = Patch({"0": portllm.PatchModule(torch.randn(48, 4, generator=g), torch.randn(4, 64, generator=g), 0.5)})
    pb = Patch({"0": portllm.PatchModule(torch.randn(48, 2, generator=g), torch.randn(2, 64, generator=g), 2.0)})
    serve.attach(net, {"a": pa}, max_patches=3, max_rank=4)
    x = torch.randn(4, 64, generator=g)
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(net, backend="eager", dynamic=False)
    with torch.no_grad(), serve.route(net, ["a", None, "a", None]):
        compiled(x)
        frames = counts["stats"]["unique_graphs"]
        serve.load(net, "b", pb)
        serve.load(net, "a", pb)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(x)
    assert counts["stats"]["unique_graphs"] == frames
    with torch.no_grad():
        expected = lin(x) + torch.tensor([1.0, 0, 1, 0])[:, None] * 2.0 * (x @ pb["0"].A.t()) @ pb["0"].B.t()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_attach_empty_then_load(adapters):
    """Slots sized up front, patches loaded later: the serving stack's start-up."""
    model = llama(seed=0)
    with pytest.raises(serve.ServeError, match="nothing to attach"):
        serve.attach(model, {}, max_patches=2, max_rank=8)
    serve.attach(model, {}, max_patches=2, max_rank=8, target_modules=TARGETS)
    assert serve.loaded(model) == {}
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    serve.load(model, "a", adapters["a"])
    with torch.no_grad(), serve.route(model, [None, "a"]):
        out = model(input_ids=ids).logits
    assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])


def test_grouping_is_computed_once_per_batch(adapters, monkeypatch):
    """Every layer of a forward routes the same tokens: the slots and the kernels' grouping are
    computed once per batch shape, not once per layer, and a new route starts afresh."""
    from portllm import ops

    calls, resolved = [], []
    real, real_resolve = ops.lora_tiles, ops.resolve_backend
    monkeypatch.setattr(ops, "lora_tiles", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **kw: resolved.append(1) or real_resolve(*a, **kw))
    model = llama(seed=0)
    serve.attach(model, adapters)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with serve.route(model, ["a", None, "b"]):
            first = model(input_ids=ids).logits
            assert len(calls) == 1 and len(resolved) == 1  # the backend too: once per batch, not per layer
            model(input_ids=ids[:, :4])  # another token count: one more grouping
            assert len(calls) == 2
        with serve.route(model, ["b", None, "a"]):
            swapped = model(input_ids=ids).logits
        assert len(calls) == 3
    assert torch.equal(swapped[1], first[1]) and not torch.allclose(swapped[0], first[0])


def test_pmss_patch_is_served():
    """A PMSS result, as a patch (pmss.to_patch), served in a mixed batch: the same logits as the
    PMSS model's for its rows, the base model's for the others."""
    from portllm import pmss

    tuned = pmss.inject(llama(seed=0), rank=8)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for m in pmss.pmss_modules(tuned).values():
            m.U.copy_(torch.randn(m.U.shape, generator=g) * 0.2)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
    model = llama(seed=0)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    serve.attach(model, {"pmss": pmss.to_patch(tuned)})
    with torch.no_grad(), serve.route(model, ["pmss", None]):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1], base[1])
    assert (expected[0] - base[0]).abs().max() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_after_hot_swap(adapters):
    """A routed forward captured in a CUDA graph (Triton kernels: no host synchronisation), then
    patches swapped in place: the replay computes with the new patch, nothing is re-captured."""
    model = llama(seed=0).cuda()
    serve.attach(model, {"a": adapters["a"]}, max_patches=2, max_rank=8)
    for m in model.modules():
        if isinstance(m, serve.PatchedLinear):
            m.backend = "triton"
    ids = torch.randint(0, 128, (2, 5), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    out = {}
    with torch.no_grad(), serve.route(model, ["a", None]):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(input_ids=ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["logits"] = model(input_ids=ids, use_cache=False).logits
        graph.replay()
        first = out["logits"].clone()
        eager_a = model(input_ids=ids, use_cache=False).logits
        serve.load(model, "a", adapters["b"])  # replace in place
        graph.replay()
        swapped = out["logits"].clone()
        eager_b = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(first, eager_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(swapped, eager_b, atol=1e-4, rtol=1e-4)
    assert torch.equal(swapped[1], first[1]) and not torch.allclose(swapped[0], first[0])


def test_beam_search_matches_peft(adapters):
    """generate(num_beams=k) repeats each request k times: the names per request route every beam,
    as PEFT's adapter_names do for beams (greedy beam search: the same tokens)."""
    from peft import PeftModel

    names = ["a", None, "b"]
    ids = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(11))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    ref = PeftModel.from_pretrained(llama(seed=0), adapters["a"], adapter_name="a")
    ref.load_adapter(adapters["b"], adapter_name="b")
    ref.eval()
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, adapter_names=[n or "__base__" for n in names], **kw)
    model = serve.attach(llama(seed=0), adapters)
    with torch.no_grad(), serve.route(model, names):
        got = model.generate(input_ids=ids, **kw)
    assert torch.equal(got, expected)
    with torch.no_grad(), serve.route(model, names):  # several returned sequences per request
        many = model.generate(input_ids=ids, num_return_sequences=2, **kw)
    assert many.shape[0] == 6 and torch.equal(many[::2], expected)


def test_a_batch_that_is_no_multiple_of_the_names_is_refused(adapters):
    model = serve.attach(llama(seed=0), adapters)
    ids = torch.randint(0, 128, (5, 4), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), serve.route(model, ["a", "b"]), pytest.raises(ValueError, match="5 rows but names has 2"):
        model(input_ids=ids)


def test_attach_backend_is_passed_down(adapters):
    model = serve.attach(llama(seed=0), adapters, backend="reference")
    assert {m.backend for m in model.modules() if isinstance(m, serve.PatchedLinear)} == {"reference"}
    with pytest.raises(portllm.ops.BackendUnavailableError, match="'cuda' is not available"):
        serve.attach(llama(seed=0), adapters, backend="cuda")
