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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_matches_model_rmsnorm(dtype: torch.dtype) -> None:
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = kernels.rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == torch.float32  # normalised in float32 whatever the input, as the model does
    assert torch.equal(got, norm(x))


def test_fallback_has_gradients() -> None:
    w = torch.ones(8, requires_grad=True)
    x = torch.randn(2, 8, requires_grad=True)
    kernels.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is not None


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
