"""Optional fused kernels, chosen once per process: apex's fused RMSNorm where it works, torch elsewhere.

NVIDIA's PyTorch containers (docker/Dockerfile) ship apex with its CUDA extensions; a pip-installed
torch usually has no apex. `rms_norm(x, weight, eps)` takes the fused kernel for CUDA tensors when
apex imports, CUDA is present and a small check call agrees with the torch formula; otherwise (and
for CPU tensors always) the torch formula runs. Both compute in float32 (or wider) whatever the
autocast dtype and return that dtype, like coe_dist.model.transformer.RMSNorm, so choosing one or the
other changes the speed, not the model. `kernel_report()` is the line for the start-up log.
COE_DIST_KERNELS=torch forces the torch path (e.g. to compare the two).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

FusedRMSNorm = Callable[[torch.Tensor, torch.Tensor, tuple[int, ...], float], torch.Tensor]


@dataclass(frozen=True)
class Choice:
    fused_rms_norm: FusedRMSNorm | None  # apex.normalization.fused_layer_norm.fused_rms_norm_affine, or None
    reason: str  # why: shown by kernel_report()


_choice: Choice | None = None


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight in float32 or wider: the reference formula (the same as the model's RMSNorm)."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)) * weight


def _apex_call(fn: FusedRMSNorm, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    # apex casts its inputs to the autocast dtype when autocast is on; keep float32 like the torch path.
    with torch.autocast(x.device.type, enabled=False):
        return fn(x32, weight.to(x32.dtype), (x32.shape[-1],), eps)


def probe(device: str = "cuda", env: dict[str, str] | None = None) -> Choice:
    """Decide whether apex's fused RMSNorm is usable on `device` (importable, and a check call agrees)."""
    env = dict(os.environ) if env is None else env
    if env.get("COE_DIST_KERNELS", "auto") == "torch":
        return Choice(None, "torch (COE_DIST_KERNELS=torch)")
    if device == "cuda" and not torch.cuda.is_available():
        return Choice(None, "torch (no CUDA device)")
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except Exception as e:  # ImportError, or apex built for another torch/CUDA failing at import
        return Choice(None, f"torch (apex not importable: {type(e).__name__}: {e})")
    # apex imports without its CUDA extension (pip install without --cuda_ext): the kernel then fails
    # at its first call. Call it once on a small tensor and compare with the formula.
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 64, generator=gen).to(device)
        w = (1 + 0.1 * torch.randn(64, generator=gen)).to(device)
        got = _apex_call(fused_rms_norm_affine, x, w, 1e-6)
        ok = torch.allclose(got, torch_rms_norm(x, w, 1e-6), rtol=1e-4, atol=1e-5)
    except Exception as e:
        return Choice(None, f"torch (apex fused_rms_norm_affine failed its check call: {type(e).__name__}: {e})")
    if not ok:
        return Choice(None, "torch (apex fused_rms_norm_affine disagrees with the reference formula)")
    return Choice(fused_rms_norm_affine, "apex fused_rms_norm_affine")


def choice() -> Choice:
    global _choice
    if _choice is None:
        _choice = probe()
    return _choice


def reset() -> None:
    """Forget the decision (tests; or after changing COE_DIST_KERNELS)."""
    global _choice
    _choice = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fused = choice().fused_rms_norm if x.is_cuda else None
    if fused is not None:
        return _apex_call(fused, x, weight, eps)
    return torch_rms_norm(x, weight, eps)


def kernel_report() -> str:
    return f"kernels: rms_norm={choice().reason}"


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); None where /proc/cpuinfo is absent."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_dtype(requested: str, device: torch.device) -> str:
    """train.dtype=auto: bf16 where the device multiplies it natively (a CUDA GPU with bf16, a CPU with AVX-512
    BF16 or AMX), fp32 elsewhere (an AVX2 CPU emulates bf16 matmuls, about 10x slower than fp32)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def bf16_on_cpu_warning(device: torch.device, dtype: str) -> str | None:
    """The start-up warning for bf16 training on a CPU that emulates bf16 matmuls (AVX2 only): measured about
    11x slower than fp32 there (a 1024x128 @ 128x512 matmul, torch 2.13)."""
    if device.type != "cpu" or dtype != "bf16" or cpu_has_native_bf16() is not False:
        return None
    return ("warning: train.dtype=bf16 on a CPU without AVX-512 BF16 or AMX: bf16 matmuls are emulated here, "
            "about 10x slower than fp32; --set train.dtype=fp32 is faster on this machine")
