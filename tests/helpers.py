"""Shared test helpers: backends to test, ulp distances, error bounds."""

import torch

CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (backend, device, env): every backend that can exist, on the device it runs on. Those that cannot
# run here are still collected and reported as skipped, with the reason.
BACKEND_CASES = [
    ("reference", "cpu", {}),
    ("cpp", "cpu", {}),
    ("cpp", "cpu", {"PORTLLM_CPU_ISA": "avx512"}),  # fp32 FMAs even for bf16 factors
    ("cpp", "cpu", {"PORTLLM_CPU_ISA": "avx2"}),  # AVX2 + FMA, for CPUs without AVX-512
    ("cpp", "cpu", {"PORTLLM_CPU_ISA": "generic"}),  # the portable path
    ("triton", "cpu", {}),
    ("reference", "cuda", {}),
    ("cuda", "cuda", {}),
    ("triton", "cuda", {}),
]


def backend_id(case):
    backend, device, env = case
    return f"{backend}-{device}" + "".join(f"-{v}" for v in env.values())


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Maps floats to integers whose difference counts the representable values between them."""
    int_dtype, mask = {
        torch.float16: (torch.int16, 0x7FFF),
        torch.bfloat16: (torch.int16, 0x7FFF),
        torch.float32: (torch.int32, 0x7FFFFFFF),
    }[t.dtype]
    bits = t.contiguous().view(int_dtype).to(torch.int64)
    mag = bits & mask
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place (0 where both are NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    d = (ordered_bits(a) - ordered_bits(b)).abs()
    both_nan = a.isnan() & b.isnan()
    return torch.where(both_nan, torch.zeros_like(d), d)


def fp32_error_bound(W, B, A, scale) -> torch.Tensor:
    """Elementwise bound on |fp32 result - exact|: (r + 2)·u·(|W| + |B|·|s|·|A|), u = 2^-24,
    doubled for slack (standard dot-product bound, Higham §3.1)."""
    r = B.shape[1]
    s = torch.as_tensor(scale, dtype=torch.float64).abs().expand(r).to(W.device)
    mag = W.double().abs() + (B.double().abs() * s[None, :]) @ A.double().abs()
    return 2 * (r + 2) * 2.0**-24 * mag + 1e-30

