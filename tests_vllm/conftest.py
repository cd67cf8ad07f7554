"""The vLLM tests run in their own venv (.venv-vllm, tools/test_vllm.sh; `make test-vllm`), never
in the main suite's. Engines run inside the test process (VLLM_ENABLE_V1_MULTIPROCESSING=0: about 3 s
to start instead of 14) with a 1 GiB KV cache; one test starts vLLM's own processes, to see the
plugin loaded there through its entry point."""

import gc
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    os.environ.pop("PORTLLM_VLLM_LORA", None)  # the plugin is opted into by the tests that mean it
    os.environ.pop("VLLM_PLUGINS", None)


def engine(model_dir: str, dtype: str = "float32", lora: bool = True, max_loras: int = 2, max_lora_rank: int = 64,
           **extra):
    from vllm import LLM

    kw = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras, **extra) if lora else {}
    return LLM(model=model_dir, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_model_len=256,
               max_num_seqs=8, seed=0, **kw)


def generate(llm, loras=None, prompts=tiny.PROMPTS, new: int = tiny.NEW) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=new, temperature=0, detokenize=False, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def lora(name: str, i: int, path: str):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, i, path)


def close(llm) -> None:
    del llm
    gc.collect()


def serve(model_dir: str, loras=None, prompts=tiny.PROMPTS, **kw) -> list[list[int]]:
    """Greedy tokens from an engine made for this call alone: engines in one process must not overlap
    (closing one tears down the process-wide groups that another would still use)."""
    llm = engine(model_dir, **kw)
    try:
        return generate(llm, loras, prompts)
    finally:
        close(llm)


@contextlib.contextmanager
def plugin_on():
    """portllm's LoRA backend opted into in this process (as vLLM's entry point would call it), and
    vLLM's own restored afterwards."""
    from vllm.platforms import current_platform

    from portllm import vllm_plugin

    cls = type(current_platform)
    before = cls.__dict__.get("get_punica_wrapper"), cls.__dict__.get("_portllm_punica")
    os.environ[vllm_plugin.ENV] = "1"
    try:
        vllm_plugin.register()
        yield
    finally:
        os.environ.pop(vllm_plugin.ENV, None)
        for name, value in zip(("get_punica_wrapper", "_portllm_punica"), before):
            if value is None:
                if name in cls.__dict__:
                    delattr(cls, name)
            else:
                setattr(cls, name, value)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """θ (fp32 and bf16 on disk), θ′ (an update of it), and two PEFT LoRA adapters of θ."""
    root = tmp_path_factory.mktemp("vllm")
    m = tiny.model(0)
    d = {"base": tiny.save_model(m, str(root / "base")),
         "base_bf16": tiny.save_model(m, str(root / "base_bf16"), torch.bfloat16),
         "evolved": tiny.save_model(tiny.evolved(m, 7), str(root / "evolved")),
         "root": str(root)}
    d["lora0"] = tiny.lora_adapter(d["base"], str(root / "lora0"), rank=8, seed=1)
    d["lora1"] = tiny.lora_adapter(d["base"], str(root / "lora1"), rank=16, seed=2)
    return d
