"""The main job's FP8 release: one θ′ shipped as a block-FP8 checkpoint, as vendors ship FP8 next to
the 16-bit release (every projection's weight float8_e4m3fn with a ``weight_scale_inv`` per 128×128
block, ``quantization_config`` ``quant_method: "fp8"``), the patch ported onto it with each rounding,
and the results read back dequantized (``fp8.dequantize``: the weights transformers computes with on
a CPU, without its FP8 loader, which needs whole blocks)."""

from __future__ import annotations

import json
import os
import shutil

import torch

from portllm import fp8

BLOCK = (128, 128)


def save_fp8(model_dir: str, out_dir: str) -> None:
    """``model_dir`` (a save_pretrained checkpoint) written as a block-FP8 release in ``out_dir``."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            out[k], out[k + "_scale_inv"] = fp8.quantize(v.float(), BLOCK)
        else:
            out[k] = v
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(model_dir):
        if name == "config.json":
            with open(os.path.join(model_dir, name)) as f:
                cfg = json.load(f)
            cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(BLOCK),
                                          "activation_scheme": "dynamic"}
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(cfg, f, indent=2)
        elif name != "model.safetensors" and os.path.isfile(os.path.join(model_dir, name)):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(out_dir, name))


def load_dequantized(fp8_dir: str) -> torch.nn.Module:
    """The model of a block-FP8 checkpoint with its weights dequantized (fp32)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(fp8_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    sd = load_file(os.path.join(fp8_dir, "model.safetensors"))
    state = {k: (fp8.dequantize(v, sd[k + "_scale_inv"], BLOCK) if k + "_scale_inv" in sd else v.float())
             for k, v in sd.items() if not k.endswith("_scale_inv")}
    model.load_state_dict(state)
    return model.eval()


def retained(ported_dir: str) -> float:
    """The fraction of the patch that survived requantization, as the port reported it."""
    with open(os.path.join(ported_dir, "portllm_port.json")) as f:
        return float(json.load(f)["fp8"]["retained"])
