"""vLLM plugin (entry point ``portllm`` in the group ``vllm.general_plugins``): portllm's serving
kernels as vLLM's LoRA backend, for those who opt in.

vLLM calls every installed general plugin in each of its processes (the front end, the engine core,
the workers: before the model is built). Installing portllm changes nothing: ``register`` does
nothing unless the user opts in, with ``PORTLLM_VLLM_LORA=1`` or by naming the plugin in vLLM's own
``VLLM_PLUGINS`` (``VLLM_PLUGINS=portllm``). Opted in, it points the platform's
``get_punica_wrapper`` (where vLLM's LoRA model manager takes its wrapper class from) at
``portllm.vllm_punica``. It covers vLLM's CPU platform; on others it says so and leaves vLLM's own
LoRA path (portllm's GPU kernels in vLLM await a GPU run).
"""

from __future__ import annotations

import logging
import os

ENV = "PORTLLM_VLLM_LORA"
NAME = "portllm"
WRAPPERS = {"cpu": "portllm.vllm_punica.PortllmPunicaWrapperCPU"}

log = logging.getLogger("portllm.vllm")


def opted_in(environ=os.environ) -> bool:
    """Whether the user asked for portllm's LoRA backend: ``PORTLLM_VLLM_LORA=1``, or ``portllm``
    named in ``VLLM_PLUGINS`` (unset there means vLLM loads every plugin: no choice made)."""
    if environ.get(ENV) == "1":
        return True
    named = environ.get("VLLM_PLUGINS")
    return named is not None and NAME in [p.strip() for p in named.split(",")]


def register() -> None:
    """vLLM's entry point: called once per vLLM process; idempotent."""
    if not opted_in():
        return
    from vllm.platforms import current_platform

    cls = type(current_platform)
    qualname = WRAPPERS.get(current_platform.device_type)
    if qualname is None:
        log.warning("portllm: %s=1 asks for portllm's LoRA backend, which covers vLLM's CPU platform only; on %s "
                    "vLLM's own LoRA path stays", ENV, current_platform.device_type)
        return
    if getattr(cls, "_portllm_punica", None) == qualname:
        return
    cls.get_punica_wrapper = classmethod(lambda c: qualname)
    cls._portllm_punica = qualname
    log.info("portllm: vLLM's LoRA layers run on portllm's kernels (%s)", qualname)
