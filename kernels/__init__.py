"""Triton kernels of portllm, installed as ``portllm.kernels``.

Importing this package imports triton. Only ``portllm.ops`` imports it; use the ops, not these
launchers, from anywhere else. On a CPU, Triton runs under ``TRITON_INTERPRET=1`` (set before
triton is first imported).
"""
