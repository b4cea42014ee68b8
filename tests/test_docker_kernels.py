"""coe_dist.kernels: the fused-RMSNorm decision and the torch fallback (apex comes with the GPU image)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from coe_dist import kernels
from coe_dist.model.transformer import RMSNorm


@pytest.fixture(autouse=True)
def _fresh_choice():
    kernels.reset()
    yield
    kernels.reset()


def _fake_apex(monkeypatch: pytest.MonkeyPatch, fn) -> None:
    mod = types.ModuleType("apex.normalization.fused_layer_norm")
    mod.fused_rms_norm_affine = fn
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.normalization", types.ModuleType("apex.normalization"))
    monkeypatch.setitem(sys.modules, "apex.normalization.fused_layer_norm", mod)


def _reference_kernel(x, weight, normalized_shape, eps):
    assert normalized_shape == (x.shape[-1],) and x.dtype == weight.dtype == torch.float32
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rms_norm64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w, in float64 on the exact values of x and w (differentiable)."""
    x64, w64 = x.double(), weight.double()
    return x64 / (x64.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_and_model_rmsnorm_match_the_formula(dtype: torch.dtype) -> None:
    """kernels.rms_norm (the CPU path) and RMSNorm.forward, which calls it, against the formula in float64.
    Both compute in float32 whatever the input: a reduction of d = 32 squares and a few element-wise ops, so
    each element is within a few float32 ulps (bound: (d + 4) * eps32 relative)."""
    d, eps = 32, 1e-6
    norm = RMSNorm(d, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, d))
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = _rms_norm64(x, norm.weight.detach(), eps)
    rtol = (d + 4) * torch.finfo(torch.float32).eps
    for got in (kernels.rms_norm(x, norm.weight, eps), norm(x)):
        assert got.dtype == torch.float32  # normalised in float32 whatever the input, as the model does
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=0)


def test_fallback_gradients_match_the_formula() -> None:
    """Gradients of the CPU path w.r.t. x and w against autograd of the float64 formula."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, generator=gen, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, generator=gen)).requires_grad_(True)
    r = torch.randn(4, 16, generator=gen)
    (kernels.rms_norm(x, w, 1e-6) * r).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    (_rms_norm64(x64, w64, 1e-6) * r.double()).sum().backward()
    # Sums over 16 (d x) and 4 (d w) float32 products: a tolerance of 64 eps32, relative to the largest entry.
    rtol = 64 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=rtol * float(x64.grad.abs().max()))
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=rtol, atol=rtol * float(w64.grad.abs().max()))


def test_cpu_tensors_use_torch_even_with_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_apex(monkeypatch, lambda *a: pytest.fail("the fused kernel must not run on CPU tensors"))
    monkeypatch.setattr(kernels, "_choice", kernels.Choice(lambda *a: pytest.fail("called"), "apex (fake)"))
    kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA decision")
def test_report_without_cuda() -> None:
    assert kernels.kernel_report() == "kernels: rms_norm=torch (no CUDA device)"


def test_report_without_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "apex", None)  # `import apex` raises ImportError
    choice = kernels.probe(device="cpu", env={})
    assert choice.fused_rms_norm is None
    assert choice.reason.startswith("torch (apex not importable: ")


def test_working_apex_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_apex(monkeypatch, _reference_kernel)
    choice = kernels.probe(device="cpu", env={})
    assert choice == kernels.Choice(_reference_kernel, "apex fused_rms_norm_affine")


def test_broken_apex_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing_extension(*_):
        raise ModuleNotFoundError("No module named 'fused_layer_norm_cuda'")

    _fake_apex(monkeypatch, missing_extension)
    choice = kernels.probe(device="cpu", env={})
    assert choice.fused_rms_norm is None
    assert "failed its check call" in choice.reason and "fused_layer_norm_cuda" in choice.reason

    _fake_apex(monkeypatch, lambda x, w, shape, eps: x)  # runs, but computes something else
    assert "disagrees" in kernels.probe(device="cpu", env={}).reason


def test_env_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_apex(monkeypatch, _reference_kernel)
    assert kernels.probe(device="cpu", env={"COE_DIST_KERNELS": "torch"}).reason == "torch (COE_DIST_KERNELS=torch)"


def test_decided_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(kernels, "probe", lambda: calls.append(1) or kernels.Choice(None, "torch (test)"))
    for _ in range(3):
        kernels.kernel_report()
        kernels.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6)
    assert calls == [1]


@pytest.mark.cuda
def test_cuda_matches_reference() -> None:
    """On a GPU: whichever kernel was chosen agrees with the formula, in bf16 autocast too."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 256, generator=gen).cuda()
    w = (1 + 0.1 * torch.randn(256, generator=gen)).cuda()
    print(kernels.kernel_report())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = kernels.rms_norm(x.bfloat16(), w, 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, kernels.torch_rms_norm(x.bfloat16(), w, 1e-6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("native, device, dtype, warns", [
    (False, "cpu", "bf16", True), (True, "cpu", "bf16", False), (None, "cpu", "bf16", False),
    (False, "cpu", "fp32", False), (False, "cuda", "bf16", False)])
def test_bf16_warning_only_where_the_cpu_emulates_it(monkeypatch, native, device, dtype, warns) -> None:
    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: native)
    note = kernels.bf16_on_cpu_warning(torch.device(device), dtype)
    assert (note is not None) == warns
    if warns:
        assert "train.dtype=fp32" in note and "AVX-512 BF16" in note


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    assert kernels.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


@pytest.mark.parametrize("requested, native, cuda_bf16, device, want", [
    ("auto", False, None, "cpu", "fp32"), ("auto", True, None, "cpu", "bf16"), ("auto", None, None, "cpu", "fp32"),
    ("auto", False, True, "cuda", "bf16"), ("auto", False, False, "cuda", "fp32"),
    ("bf16", False, None, "cpu", "bf16"), ("fp32", True, True, "cuda", "fp32")])
def test_auto_dtype_is_bf16_only_where_it_is_native(monkeypatch, requested, native, cuda_bf16, device, want) -> None:
    """train.dtype=auto: bf16 on a GPU that has it or a CPU with AVX-512 BF16 / AMX; an explicit dtype stays."""
    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert kernels.resolve_dtype(requested, torch.device(device)) == want
