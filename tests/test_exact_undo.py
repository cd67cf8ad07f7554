"""apply_patch(exact=True) then remove_patch: every weight back bit for bit, in every dtype."""

import pytest
import torch

import portllm
from portllm import exact
from portllm.merge import NonFiniteMergeError
from portllm.patch import Patch, PatchModule

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# (out, in): odd shapes, one wider than a chunk of the delta, one that spans several chunks.
SHAPES = [(5, 123), (123, 5), (67, 300), (3, 1 << 19), (1100, 1000)]


class Net(torch.nn.Module):
    def __init__(self, shapes, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList()
        for out_f, in_f in shapes:
            lin = torch.nn.Linear(in_f, out_f, bias=False)
            lin.weight.data = torch.randn(out_f, in_f, generator=g).to(dtype)
            self.layers.append(lin)


def make_patch(net, rank=4, rel=0.02, seed=1, fan_in_fan_out=False):
    """A patch whose delta is about ``rel`` of each weight's RMS."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, lin in enumerate(net.layers):
        out_f, in_f = lin.weight.shape
        B, A = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
        scale = rel * float(lin.weight.detach().float().std()) / float((B @ A).std())
        mods[f"layers.{i}"] = PatchModule(B, A, scale, fan_in_fan_out)
    return Patch(mods)


def bits(net):
    return [lin.weight.data.view(INT[lin.weight.dtype]).clone() for lin in net.layers]


def assert_same_bits(before, after):
    for i, (a, b) in enumerate(zip(before, after)):
        bad = (a != b).sum().item()
        assert bad == 0, f"layer {i}: {bad} of {a.numel()} weights differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rel", [0.002, 0.02, 0.5])
def test_exact_roundtrip(dtype, rel):
    net = Net(SHAPES, dtype)
    before = bits(net)
    patch = make_patch(net, rel=rel)
    portllm.apply_patch(net, patch, exact=True)
    changed = sum(int((a != b).sum()) for a, b in zip(before, bits(net)))
    assert changed > 0.3 * sum(a.numel() for a in before), "the merge must have changed the weights"
    # The merged weights are the plain merge's, bit for bit.
    plain = Net(SHAPES, dtype)
    portllm.apply_patch(plain, patch)
    assert_same_bits(bits(plain), bits(net))
    assert len(portllm.exact_merges(net)) == 1
    portllm.remove_patch(net, patch)
    assert_same_bits(before, bits(net))
    assert portllm.exact_merges(net) == []


def test_inexact_remove_is_not_bit_exact_in_bf16():
    """What exact=True is for: the plain undo leaves some weights an ulp off."""
    net = Net(SHAPES[-1:], torch.bfloat16)
    before = bits(net)
    patch = make_patch(net, rel=0.02)
    portllm.apply_patch(net, patch)
    portllm.remove_patch(net, patch)
    assert (before[0] != bits(net)[0]).sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_side_information_is_small(dtype):
    net = Net([(1024, 1024)], dtype)
    portllm.apply_patch(net, make_patch(net, rank=16, rel=0.02), exact=True)
    rec = portllm.exact_merges(net)[0]
    assert 0 < rec.bits_per_weight <= 1.0, rec.bits_per_weight


def test_switch_a_to_b_and_back_is_exact():
    net = Net(SHAPES, torch.bfloat16)
    before = bits(net)
    a, b = make_patch(net, seed=1), make_patch(net, seed=2, rel=0.1)
    portllm.apply_patch(net, a, exact=True)
    with_a = bits(net)
    portllm.apply_patch(net, b, exact=True)  # stacked: A then B
    portllm.remove_patch(net, b)
    assert_same_bits(with_a, bits(net))
    portllm.remove_patch(net, a)
    portllm.apply_patch(net, b, 0.5, exact=True)
    portllm.remove_patch(net, b, 0.5)
    assert_same_bits(before, bits(net))


def test_several_patches_in_one_exact_merge():
    net = Net([(40, 70), (70, 40)], torch.float16)
    before = bits(net)
    p1, p2 = make_patch(net, seed=3), make_patch(net, seed=4, rank=7)
    portllm.apply_patch(net, [p1, p2], [1.0, -0.7], exact=True)
    with pytest.raises(portllm.ExactUndoError, match="no exact merge"):
        portllm.remove_patch(net, [p1, p2], [1.0, 0.7], exact=True)
    portllm.remove_patch(net, [p1, p2], [1.0, -0.7])
    assert_same_bits(before, bits(net))


def test_remove_matches_a_reloaded_patch(tmp_path):
    net = Net([(33, 65)], torch.bfloat16)
    before = bits(net)
    patch = make_patch(net)
    portllm.apply_patch(net, patch, exact=True)
    patch.save(str(tmp_path / "p"))
    portllm.remove_patch(net, Patch.load(str(tmp_path / "p")))
    assert_same_bits(before, bits(net))


def test_changed_weights_are_refused_untouched():
    net = Net(SHAPES[:2], torch.bfloat16)
    patch = make_patch(net)
    portllm.apply_patch(net, patch, exact=True)
    with torch.no_grad():
        net.layers[1].weight[0, 0] += 1.0
    now = bits(net)
    with pytest.raises(portllm.ExactUndoError, match="layers.1.*changed"):
        portllm.remove_patch(net, patch)
    assert_same_bits(now, bits(net))  # nothing written, layer 0 included


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_every_backend_undoes_exactly(backend):
    if portllm.ops.backend_unavailable_reason(backend, "cpu"):
        pytest.skip(portllm.ops.backend_unavailable_reason(backend, "cpu"))
    net = Net(SHAPES[:3], torch.bfloat16)
    before = bits(net)
    patch = make_patch(net, rank=5)
    portllm.apply_patch(net, patch, exact=True, backend=backend)
    portllm.remove_patch(net, patch)
    assert_same_bits(before, bits(net))


def test_a_different_cpu_path_is_refused(monkeypatch):
    from portllm import _ext

    if _ext.cpu_isa() == "generic":
        pytest.skip("this CPU has only the generic path")
    net = Net(SHAPES[:2], torch.bfloat16)
    patch = make_patch(net)
    portllm.apply_patch(net, patch, exact=True, backend="cpp")
    now = bits(net)
    monkeypatch.setenv("PORTLLM_CPU_ISA", "generic")
    with pytest.raises(portllm.ExactUndoError, match="layers.0: the exact merge ran on cpp@"):
        portllm.remove_patch(net, patch)
    assert_same_bits(now, bits(net))
    monkeypatch.delenv("PORTLLM_CPU_ISA")
    portllm.remove_patch(net, patch)


def test_out_of_order_and_unknown_removals():
    net = Net(SHAPES[:2], torch.float32)
    a, b = make_patch(net, seed=1), make_patch(net, seed=2)
    portllm.apply_patch(net, a, exact=True)
    portllm.apply_patch(net, b, exact=True)
    with pytest.raises(portllm.ExactUndoError, match="not the latest"):
        portllm.remove_patch(net, a, exact=True)
    with pytest.raises(portllm.ExactUndoError, match="no exact merge"):
        portllm.remove_patch(net, a, 2.0, exact=True)


def test_overflow_is_refused_all_or_nothing():
    net = Net([(20, 30), (30, 20)], torch.float16)
    before = bits(net)
    patch = make_patch(net)
    patch.modules["layers.1"].scale = 1e5  # overflows fp16 in the second module only
    with pytest.raises(NonFiniteMergeError, match="layers.1"):
        portllm.apply_patch(net, patch, exact=True)
    assert_same_bits(before, bits(net))
    assert portllm.exact_merges(net) == []


@pytest.mark.parametrize("gaps", [[0], [254], [255], [256], [510, 0, 1, 765, 3]])
def test_position_stream_roundtrip(gaps):
    idx = torch.tensor(gaps).cumsum(0) + torch.arange(len(gaps))
    stream = exact._encode_positions(idx)
    assert stream.dtype == torch.uint8
    assert torch.equal(exact._decode_positions(stream), idx)


def test_failure_midway_rolls_back(monkeypatch):
    """An error while merging the second weight undoes the first, exactly; nothing is recorded."""
    net = Net(SHAPES[:3], torch.bfloat16)
    before = bits(net)
    patch = make_patch(net)
    real, calls = exact.merge_recorded, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(exact, "merge_recorded", flaky)
    with pytest.raises(KeyboardInterrupt):
        portllm.apply_patch(net, patch, exact=True)
    assert_same_bits(before, bits(net))
    assert portllm.exact_merges(net) == []
    with pytest.raises(portllm.BackendUnavailableError):
        portllm.apply_patch(net, patch, exact=True, backend="cuda")
    assert_same_bits(before, bits(net))


def test_conv1d_weights_fan_in_fan_out():
    """GPT-2's Conv1D weights are stored [in, out]: the update goes to W.t(), a strided view."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=48, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    mods = {}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"):
        w = model.get_submodule(name).weight  # [in, out]
        in_f, out_f = w.shape
        mods[name] = PatchModule(torch.randn(out_f, 4, generator=g) * 0.05, torch.randn(4, in_f, generator=g) * 0.05,
                                 1.0, fan_in_fan_out=True)
    patch = Patch(mods)
    before = {k: v.view(torch.int16).clone() for k, v in model.state_dict().items() if v.dtype == torch.bfloat16}
    portllm.apply_patch(model, patch, exact=True)
    changed = model.get_submodule("transformer.h.0.mlp.c_fc").weight.view(torch.int16)
    assert not torch.equal(changed, before["transformer.h.0.mlp.c_fc.weight"])
    portllm.remove_patch(model, patch)
    for k, v in model.state_dict().items():
        if v.dtype == torch.bfloat16:
            assert torch.equal(v.view(torch.int16), before[k]), k


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32], ids=str)
@pytest.mark.parametrize("n,density", [(0, 0.5), (1, 1.0), (5, 0.5), (65536 * 3 + 7, 0.0),
                                       (65536 * 3 + 7, 0.03), (65536 + 3, 1.0)], ids=str)
def test_bit_misses_op(dtype, n, density):
    """The C++ op finds exactly the positions and differences of the PyTorch expression, in order,
    across block and 64-bit-word boundaries (sizes not a multiple of either), none or all differing."""
    from portllm import _ext

    if not _ext.has_kernel("bit_misses", "CPU"):
        pytest.skip("the extension has no bit_misses")
    gen = torch.Generator().manual_seed(n)
    info = torch.iinfo(dtype)
    a = torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(dtype)
    b = a.clone()
    hit = torch.rand(n, generator=gen) < density
    b[hit] = torch.randint(info.min, info.max, (int(hit.sum()),), generator=gen, dtype=torch.int64).to(dtype)
    loc, d = torch.ops.portllm.bit_misses(a, b)
    want = (b != a).nonzero().squeeze(1)
    assert torch.equal(loc, want)
    assert torch.equal(d, a[want].to(torch.int64) - b[want].to(torch.int64))
    torch.library.opcheck(torch.ops.portllm.bit_misses, (a, b), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="int16 or both int32"):
        torch.ops.portllm.bit_misses(a, b.to(torch.int64))
    with pytest.raises(RuntimeError, match="1-D of the same length"):
        torch.ops.portllm.bit_misses(a, b[:-1] if n else b.view(1, 0))


@pytest.mark.parametrize("exact_arg", [None, False])
def test_removing_below_the_top_is_refused_before_any_change(exact_arg):
    """Exact merges are a stack: removing A while B (merged after it) is on the model would change the
    weights B's undo was recorded on. Refused, whatever ``exact=``, with every bit unchanged; then
    B, A in reverse order restore the original bits."""
    net = Net(SHAPES[:3], torch.bfloat16)
    before = bits(net)
    a, b = make_patch(net, seed=1), make_patch(net, seed=2)
    portllm.apply_patch(net, a, exact=True)
    portllm.apply_patch(net, b, exact=True)
    merged = bits(net)
    with pytest.raises(portllm.ExactUndoError, match=r"not the latest one .*1 merge\(s\) were applied after it"):
        portllm.remove_patch(net, a, exact=exact_arg)
    assert_same_bits(merged, bits(net))
    assert len(portllm.exact_merges(net)) == 2
    portllm.remove_patch(net, b)
    portllm.remove_patch(net, a)
    assert_same_bits(before, bits(net))


@pytest.mark.parametrize("exact_flag", [True, False])
def test_tied_weights_are_merged_once_and_removable(exact_flag):
    """A patch naming two modules that share one weight: the weight gets both deltas (PEFT adds each
    module's delta to the shared tensor), in one merge, and the exact merge comes off bit for bit."""
    net = Net([(40, 40), (40, 40), (40, 40)], torch.bfloat16)
    net.layers[1].weight = net.layers[0].weight
    before = bits(net)
    p = make_patch(net, rel=0.05)
    W0 = net.layers[0].weight.detach().float()
    want = W0.clone()
    for name in ("layers.0", "layers.1"):
        m = p[name]
        want += m.scale * (m.B @ m.A)
    portllm.apply_patch(net, p, exact=exact_flag)
    got = net.layers[0].weight.detach().float()
    ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-30)
    assert bool(((got - want).abs() <= ulp).all()), "both deltas, rounded once"
    assert net.layers[1].weight is net.layers[0].weight
    if exact_flag:
        assert len(portllm.exact_merges(net)[0].weights) == 2  # the shared tensor once, plus layers.2
        portllm.remove_patch(net, p)
        assert_same_bits(before, bits(net))


@pytest.mark.parametrize("exact_flag", [True, False])
def test_a_second_removal_is_refused(exact_flag):
    """After a patch is removed, removing it again would subtract it a second time: refused, with
    every bit unchanged, until it is merged again."""
    net = Net(SHAPES[:2], torch.bfloat16)
    before = bits(net)
    p = make_patch(net, rel=0.05)
    portllm.apply_patch(net, p, exact=exact_flag)
    portllm.remove_patch(net, p)
    after = bits(net)
    if exact_flag:
        assert_same_bits(before, after)
    with pytest.raises(portllm.ExactUndoError, match="already removed .* subtract it twice"):
        portllm.remove_patch(net, p)
    assert_same_bits(after, bits(net))
    portllm.apply_patch(net, p)  # merged again: removable again
    portllm.remove_patch(net, p)


def test_a_plain_merge_under_an_exact_one_is_not_removed_first():
    net = Net(SHAPES[:2], torch.float16)
    a, b = make_patch(net, seed=1), make_patch(net, seed=2)
    portllm.apply_patch(net, a)
    portllm.apply_patch(net, b, exact=True)
    merged = bits(net)
    with pytest.raises(portllm.ExactUndoError, match="exact ones among them"):
        portllm.remove_patch(net, a)
    assert_same_bits(merged, bits(net))
    portllm.remove_patch(net, b)
    with pytest.raises(portllm.ExactUndoError, match="was not exact"):
        portllm.remove_patch(net, a, exact=True)
    portllm.remove_patch(net, a)
    assert portllm.exact_merges(net) == []


def test_backend_from_the_environment_never_stops_an_exact_merge(monkeypatch):
    """PORTLLM_BACKEND names the merge's backend; the exact merge's comparison (bit_misses, reference and
    cpp only) picks its own, so a "triton" there merges and undoes exactly instead of failing half-way."""
    if portllm.ops.backend_unavailable_reason("triton", "cpu"):
        pytest.skip(portllm.ops.backend_unavailable_reason("triton", "cpu"))
    monkeypatch.setenv("PORTLLM_BACKEND", "triton")
    net = Net(SHAPES[:2], torch.float16)
    before = bits(net)
    patch = make_patch(net, rank=3)
    portllm.apply_patch(net, patch, exact=True)
    assert portllm.exact_merges(net)[0].weights["layers.0"][0].path == "triton"
    portllm.remove_patch(net, patch)
    assert_same_bits(before, bits(net))
