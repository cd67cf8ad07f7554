"""The port's stream (portllm.port_stream): patched tensors go through in chunks of rows, the rest is
copied; whatever the chunk size, the output is the same bytes. Chunks of one row, of an odd number of
rows, and whole tensors are compared file by file, for plain, fan_in_fan_out (GPT-2's Conv1D), fused
expert (Mixtral) and dtype-converting ports; a merge refused inside a chunk names the module and rows."""

import hashlib
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import evolve, llama  # noqa: E402

import portllm  # noqa: E402
from portllm import ops, port_stream, reference  # noqa: E402
from portllm.merge import NonFiniteMergeError  # noqa: E402
from portllm.patch import Patch, PatchModule  # noqa: E402

# 1 byte: one row (one expert) per chunk; 1000 bytes: a few rows, the last chunk shorter; 2**40: whole tensors
CHUNKS = [1, 1000, 1 << 40]
BACKENDS = [b for b in ("cpp", "reference") if b in ops.available_backends("cpu")]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each CPU backend; the reference's own row blocks made small (a chunk is a multiple of them), so
    that these tiny weights are cut into several chunks on either backend."""
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 64)
    return request.param


def digests(path) -> dict:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def random_patch(model, targets, rank=3, fan_in_fan_out=False, seed=0, dtype=torch.float32) -> Patch:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, p in model.named_parameters():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            rows, cols = p.shape[::-1] if fan_in_fan_out else p.shape
            mods[module] = PatchModule((torch.randn(rows, rank, generator=g) * 0.3).to(dtype),
                                       (torch.randn(rank, cols, generator=g) * 0.3).to(dtype), 1.5, fan_in_fan_out)
    assert mods
    return Patch(mods)


def ports_agree(src, patch, tmp_path, monkeypatch, backend, **kw):
    """Ports with every chunk size; returns the last output, asserting that all are the same bytes."""
    seen = []
    for i, chunk in enumerate(CHUNKS):
        monkeypatch.setattr(port_stream, "CHUNK_BYTES", chunk)
        out = tmp_path / f"out{i}"
        portllm.port(str(src), patch, str(out), device="cpu", backend=backend, progress=False, log=None, **kw)
        seen.append(digests(out))
    assert seen[0] == seen[1] == seen[2]
    return out


def test_llama_chunked_port_is_the_same_bytes(tmp_path, monkeypatch, backend):
    model = evolve(llama(seed=0)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    patch = random_patch(model, ("q_proj", "v_proj", "down_proj", "up_proj"), dtype=torch.bfloat16)
    out = ports_agree(tmp_path / "src", patch, tmp_path, monkeypatch, backend)
    portllm.apply_patch(model, patch, backend=backend)  # and the bytes are the in-memory merge's
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k


def test_dtype_conversion_chunked(tmp_path, monkeypatch, backend):
    model = llama(seed=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    patch = random_patch(model, ("o_proj", "gate_proj"))
    out = ports_agree(tmp_path / "src", patch, tmp_path, monkeypatch, backend, dtype="float32")
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())
    ref = model.float()
    portllm.apply_patch(ref, patch, backend=backend)
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k


def test_gpt2_fan_in_fan_out_chunked(tmp_path, monkeypatch, backend):
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    patch = random_patch(model, ("c_attn", "c_fc", "c_proj"), fan_in_fan_out=True)
    out = ports_agree(tmp_path / "src", patch, tmp_path, monkeypatch, backend)
    portllm.apply_patch(model, patch, backend=backend)
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # experts one tensor each on disk; fused [E, ., .]
def test_moe_experts_chunked(tmp_path, monkeypatch, backend, family):
    from test_moe import adapter, build

    model = build(family, dtype=torch.bfloat16)
    adapter(model.float(), tmp_path / "a")
    model = build(family, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    out = ports_agree(tmp_path / "src", str(tmp_path / "a"), tmp_path, monkeypatch, backend)
    portllm.apply_patch(model, Patch.load(tmp_path / "a"), backend=backend)
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k


def test_overflow_in_a_chunk_names_module_and_rows(tmp_path, monkeypatch):
    model = llama(seed=0).to(torch.float16)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[5:7] = 60000.0  # rows 5, 6 overflow once patched
    model.save_pretrained(tmp_path / "src")
    q = model.model.layers[1].self_attn.q_proj.weight
    patch = Patch({"model.layers.1.self_attn.q_proj": PatchModule(torch.full((q.shape[0], 1), 100.0),
                                                                  torch.full((1, q.shape[1]), 100.0), 1.0)})
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", q.shape[1])  # (row blocks of the reference's: one row)
    monkeypatch.setattr(port_stream, "CHUNK_BYTES", 3 * q.shape[1] * 2)  # 3 rows per chunk: rows 3:6 fail first
    with pytest.raises(NonFiniteMergeError, match=r"module model\.layers\.1\.self_attn\.q_proj \(rows 3:6\): "):
        portllm.port(str(tmp_path / "src"), patch, str(tmp_path / "out"), device="cpu", progress=False, log=None)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["src"]


def test_pool_holds_at_most_three_buffers(tmp_path, monkeypatch):
    """The pipeline's memory: chunks come from pools of three buffers of at most the chunk size."""
    made = []
    real = port_stream._Pool.__init__

    def spy(self, nbytes, count):
        real(self, nbytes, count)
        made.append(self)

    monkeypatch.setattr(port_stream._Pool, "__init__", spy)
    model = llama(seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    patch = random_patch(model, ("q_proj", "down_proj"))
    monkeypatch.setattr(port_stream, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 64)
    portllm.port(str(tmp_path / "src"), patch, str(tmp_path / "out"), device="cpu", progress=False, log=None)
    assert len(made) == 2 and 1 <= made[0].made <= 3 and made[0].nbytes <= 4096 and made[1].made == 0
