"""Files read as strictly as the safetensors library reads them, and clear one-line errors that name
the file and the field."""

import json
import os
import struct

import pytest
import torch
from safety_fixtures import make_checkpoint, make_patch, snapshot

from portllm import cli
from portllm.checkpoint import Checkpoint, CheckpointError
from portllm.safetensors_io import SafetensorsError, SafetensorsReader, write_tensors


def raw_file(path, header: dict | list | str, data: bytes):
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


T = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("header,data,message", [
    ({"a": dict(T, data_offsets=[-8, 0])}, b"", "malformed header entry"),
    ({"a": dict(T, data_offsets=[0, 8]), "b": dict(T, data_offsets=[4, 12])}, bytes(12), "must not overlap"),
    ({"a": dict(T, data_offsets=[8, 16]), "b": dict(T, data_offsets=[0, 8])}, bytes(16), None),  # order in file ok
    ({"a": dict(T, data_offsets=[0, 8]), "b": dict(T, data_offsets=[16, 24])}, bytes(24), "expected 8"),
    ({"a": dict(T, data_offsets=[0, 8])}, bytes(12), "bytes after the last tensor"),
    ({"a": dict(T, data_offsets=[0, 8])}, bytes(4), "truncated"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "malformed header entry"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "malformed header entry"),
    ([1, 2], b"", "not an object"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], '
     '"data_offsets": [0, 8]}}', bytes(8), "appears twice"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
])
def test_header_validation(tmp_path, header, data, message):
    path = tmp_path / "x.safetensors"
    raw_file(path, header, data)
    if message is None:
        with SafetensorsReader(str(path)) as rd:
            assert set(rd.keys()) == {"a", "b"}
        return
    with pytest.raises(SafetensorsError, match=message) as e:
        SafetensorsReader(str(path))
    assert str(path) in str(e.value)


def test_reader_agrees_with_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    t = {"w": torch.randn(3, 5), "b": torch.randn(7).half()}
    write_tensors(str(tmp_path / "ok.safetensors"), t)
    ref = load_file(str(tmp_path / "ok.safetensors"))
    with SafetensorsReader(str(tmp_path / "ok.safetensors")) as rd:
        assert all(torch.equal(rd[k], ref[k]) for k in t)


def test_a_tensor_in_two_shards_is_refused(tmp_path, capsys):
    model = tmp_path / "m"
    make_checkpoint(model)
    files = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))
    with SafetensorsReader(str(model / files[0])) as rd:
        dup = {k: rd[k] for k in rd.keys()}
    with SafetensorsReader(str(model / files[1])) as rd:
        both = {k: rd[k] for k in rd.keys()}
    both.update(dup)
    write_tensors(str(model / files[1]), both)
    with pytest.raises(CheckpointError, match="is in two shards"):
        Checkpoint(str(model))
    make_patch().save(str(tmp_path / "p"))
    before = snapshot(str(tmp_path))
    code = cli.main(["port", "--model", str(model), "--patch", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
                     "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "is in two shards" in err and "\n" not in err
    assert snapshot(str(tmp_path)) == before


@pytest.mark.parametrize("index,message", [
    ([1], "weight_map"), ({"weight_map": {"a": 3}}, "weight_map"), ("{", "cannot read the shard index"),
])
def test_bad_index(tmp_path, index, message):
    model = tmp_path / "m"
    make_checkpoint(model)
    with open(model / "model.safetensors.index.json", "w") as f:
        f.write(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError, match=message) as e:
        Checkpoint(str(model))
    assert "model.safetensors.index.json" in str(e.value)


def test_adapter_config_not_an_object(tmp_path, capsys):
    make_patch().save(str(tmp_path / "p"))
    with open(tmp_path / "p" / "adapter_config.json", "w") as f:
        f.write("[]")
    code = cli.main(["inspect", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "adapter_config.json: expected a JSON object" in err


def test_device_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_checkpoint(tmp_path / "m")
    make_patch().save(str(tmp_path / "p"))
    code = cli.main(["port", "--model", str(tmp_path / "m"), "--patch", str(tmp_path / "p"), "--out",
                     str(tmp_path / "o"), "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == ("portllm port: error: --device cuda: this machine has no CUDA GPU that torch can use "
                                 "(use --device cpu)")
    assert not (tmp_path / "o").exists()
