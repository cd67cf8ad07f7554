"""Directories written whole or not at all."""

from __future__ import annotations

import os
import shutil


def replace_dir(new: str, dest: str):
    """Renames new to dest; an existing dest is moved aside first and removed after."""
    old = None
    if os.path.exists(dest):
        old = dest + ".portllm-old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(new, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)
