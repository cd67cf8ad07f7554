"""PMSS skeleton fine-tuning (arXiv 2409.16722): train only an r×r core U between columns
C = W[:, J] and rows R = W[I, :] selected from the frozen weight itself.

    model = portllm.pmss.inject(model, rank=256)   # only the U's are trainable
    ... train ...
    portllm.pmss.save(model, "pmss.safetensors")   # indices, U, rank, scale, base fingerprint
    patch = portllm.pmss.to_patch(model)           # portable: B = s·C·U, A = R
    portllm.pmss.merge(model)                      # W += s·C·U·R, plain Linear layers again

Under FSDP2: inject first, then fully_shard (portllm.pmss.sharded says what each function does there).
"""

from portllm.pmss.layer import PMSSLinear, pmss_linear
from portllm.pmss.model import PMSSLoadError, inject, load, merge, merged_state_dict, pmss_modules, save, to_patch
from portllm.pmss.select import select_skeleton

__all__ = ["PMSSLinear", "PMSSLoadError", "inject", "load", "merge", "merged_state_dict", "pmss_linear", "pmss_modules",
           "save",
           "select_skeleton", "to_patch"]
