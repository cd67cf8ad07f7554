"""The main job's FP4 release: one θ′ shipped as an NVFP4 checkpoint, as llm-compressor writes one
(every projection's weight packed e2m1 with an e4m3 scale per 16 inputs and a global fp32 scale,
``quantization_config`` compressed-tensors ``nvfp4-pack-quantized``), the patch ported onto it with
each rounding (``allow_low_retention``: nearest keeps almost nothing, and the demo shows it), and the
results read back dequantized (``nvfp4.dequantize``: the weights compressed-tensors decompresses, in
fp32, before its cast to bf16)."""

from __future__ import annotations

import json
import os
import shutil

import torch

from portllm import nvfp4


def save_nvfp4(model_dir: str, out_dir: str) -> None:
    """``model_dir`` (a save_pretrained checkpoint) written as an NVFP4 release in ``out_dir``, quantized
    as compressed-tensors' quantizer does (``nvfp4.global_scale_for``, ``group_scales``, ``quantize``)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            W = v.float()
            g = nvfp4.global_scale_for(W.abs().max())
            sc = nvfp4.group_scales(W.reshape(W.shape[0], -1, nvfp4.GROUP).abs().amax(-1), g)
            p = k.removesuffix("weight")
            out[p + "weight_packed"], out[p + "weight_scale"], out[p + "weight_global_scale"] = \
                nvfp4.quantize(W, sc, g), sc, g
        else:
            out[k] = v
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(model_dir):
        if name == "config.json":
            with open(os.path.join(model_dir, name)) as f:
                cfg = json.load(f)
            cfg["quantization_config"] = {
                "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                    "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}}}}
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(cfg, f, indent=2)
        elif name != "model.safetensors" and os.path.isfile(os.path.join(model_dir, name)):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(out_dir, name))


def load_dequantized(nvfp4_dir: str) -> torch.nn.Module:
    """The model of an NVFP4 checkpoint with its weights dequantized (fp32)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(nvfp4_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    sd = load_file(os.path.join(nvfp4_dir, "model.safetensors"))
    state = {}
    for k, v in sd.items():
        if k.endswith(".weight_packed"):
            p = k.removesuffix("_packed")
            state[p] = nvfp4.dequantize(v, sd[p + "_scale"], sd[p + "_global_scale"])
        elif not k.endswith((".weight_scale", ".weight_global_scale")):
            state[k] = v.float()
    model.load_state_dict(state)
    return model.eval()


def retained(ported_dir: str) -> float:
    """The fraction of the patch that survived requantization, as the port reported it."""
    with open(os.path.join(ported_dir, "portllm_port.json")) as f:
        return float(json.load(f)["nvfp4"]["retained"])


def refreshed(ported_dir: str) -> tuple[int, int]:
    """(weights requantized fresh because the patch outgrew their global scale, weights merged)."""
    with open(os.path.join(ported_dir, "portllm_port.json")) as f:
        rep = json.load(f)["nvfp4"]
    return len(rep["refreshed"]), len(rep["parameters"])
