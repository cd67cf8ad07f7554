"""What vLLM can serve of a patch as a LoRA adapter, said when the patch is saved.

vLLM serves a LoRA adapter of any rank up to its engine's ``max_lora_rank``, which must be one of
``MAX_LORA_RANKS`` (vLLM 0.32, ``vllm/config/lora.py``; a smaller adapter is zero-padded to it, at
the cost of computing the padding). So a rank of 96 is served by an engine with max_lora_rank=128,
and a rank above 512 by none: an adapter of higher rank than the engine's stops vLLM's engine
(vLLM 0.32 raises in its worker and the engine dies) rather than refusing the request. Expert
(mixture-of-experts) LoRA is served by vLLM's GPU LoRA path only; its CPU path has none.
"""

from __future__ import annotations

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank_for(rank: int) -> int | None:
    """The smallest max_lora_rank vLLM accepts that serves an adapter of ``rank``; None above 512."""
    return next((r for r in MAX_LORA_RANKS if r >= rank), None)


def ranks_of(patch) -> dict[str, int]:
    """module (or expert parameter) -> rank, every one in the patch."""
    out = {name: m.rank for name, m in patch.modules.items()}
    if patch.expert_factors:
        pattern = patch.expert_config.get("rank_pattern") or {}
        for name in patch.expert_factors:
            out[name] = int(pattern.get(name, patch.expert_config.get("r", 0)))
    return out


def unservable(patch) -> str | None:
    """Why vLLM cannot serve ``patch`` as a LoRA adapter (naming the module of the highest rank) and
    what to do instead; None where it can."""
    ranks = ranks_of(patch)
    if not ranks:
        return None
    name, top = max(ranks.items(), key=lambda kv: (kv[1], kv[0]))
    if max_lora_rank_for(top) is not None:
        return None
    return (f"vLLM cannot serve this patch as a LoRA adapter: {name} has rank {top}, above vLLM's largest "
            f"max_lora_rank ({MAX_LORA_RANKS[-1]}); serve the ported checkpoint instead (portllm port), or "
            f"extract the patch again at rank <= {MAX_LORA_RANKS[-1]}")


def serving_note(patch) -> str | None:
    """One line for whoever serves the saved patch with vLLM: the ``--max-lora-rank`` to start the
    engine with, or ``unservable``'s reason; None for an empty patch."""
    ranks = ranks_of(patch)
    if not ranks:
        return None
    why = unservable(patch)
    if why:
        return why
    top = max(ranks.values())
    need = max_lora_rank_for(top)
    experts = " (expert LoRA: vLLM's GPU LoRA path only)" if patch.expert_factors else ""
    pad = f"; vLLM pads rank {top} to {need} with zeros" if need != top else ""
    return f"vLLM: serve with --enable-lora --max-lora-rank {need} (ranks {MAX_LORA_RANKS}){pad}{experts}"
