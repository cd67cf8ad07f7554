"""Serving patches: one base model, many patches, requests that mix them in a batch.

``attach`` swaps the target ``nn.Linear`` layers for :class:`PatchedLinear` layers with slots for
patches; ``route`` says which patch each row of a batch uses; ``load``/``unload`` swap patches in
and out of slots without allocating; ``detach`` gives the plain layers back. See ``model.py``.
Merged serving with exact undo is ``portllm.apply_patch(model, patch, exact=True)``.
"""

from portllm.serve.layer import PatchedLinear, Routing
from portllm.serve.model import ServeError, attach, detach, load, loaded, route, unload

__all__ = ["PatchedLinear", "Routing", "ServeError", "attach", "detach", "load", "loaded", "route", "unload"]
