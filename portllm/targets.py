"""Which modules ``target_modules`` names: one rule for PMSS, serving and extraction, PEFT's.

As PEFT's ``check_target_module_exists``: a string is a regular expression the whole module name
must match (``re.fullmatch``); a list names modules by their full name or by a dotted suffix
(``"q_proj"`` and ``"self_attn.q_proj"`` both name ``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import re


def matches(name: str, target_modules) -> bool:
    """Whether module ``name`` is one that ``target_modules`` (a regex string, or names) selects."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def describe(target_modules) -> str:
    """``target_modules`` as an error message names it."""
    if isinstance(target_modules, str):
        return f"matching {target_modules!r}"
    return "named " + ", ".join(target_modules)
