"""float8 dispatch rows (coe_dist/parallel/fp8_wire.py): the packed layout and e4m3's rounding bound, per row.

Bound, derived by hand: e4m3 keeps 3 mantissa bits, so rounding to nearest errs by at most half a unit in the
last place, 2^-4 of the value, for scaled values in the normal range (>= 2^-6); below it the spacing is the
subnormal step 2^-9, half of it 2^-10. After scaling back by s = max|row| / 448:
    |x - x~| <= max(2^-4 |x|, 2^-10 s)    for every element of the row.
"""

from __future__ import annotations

import pytest
import torch

from coe_dist.config import ConfigError, MoEConfig, validate_moe
from coe_dist.parallel.fp8_wire import dequantize_rows, quantize_rows

D = 64


def _rows(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, D, generator=g) * torch.logspace(-6, 6, 200).unsqueeze(1)  # rows of any magnitude
    x[3] = 0.0  # a zero row
    x[4, :] = 1e-3
    x[4, 7] = 1e3  # one huge element: the rest of the row falls into e4m3's subnormals
    return x


def test_packed_layout_is_d_plus_4_bytes():
    packed = quantize_rows(torch.randn(5, D))
    assert packed.dtype == torch.uint8 and packed.shape == (5, D + 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_within_e4m3_bound_per_row(seed):
    x = _rows(seed)
    got = dequantize_rows(quantize_rows(x), D)
    s = x.abs().amax(dim=1, keepdim=True) / 448.0
    bound = torch.maximum(2.0 ** -4 * x.abs(), 2.0 ** -10 * s) * (1 + 1e-6)  # + float32 rounding of the scaling
    assert ((got - x).abs() <= bound).all()
    assert torch.equal(got[3], torch.zeros(D))
    # The bound is e4m3's, not a finer format's: some element errs by more than half of it.
    rel = ((got - x).abs() / x.abs().clamp_min(1e-30))[x.abs() > 2.0 ** -6 * s]
    assert rel.max() > 2.0 ** -5


def test_round_trip_keeps_the_row_maximum():
    x = _rows(2)
    got = dequantize_rows(quantize_rows(x), D)
    idx = x.abs().argmax(dim=1, keepdim=True)  # 448 * s is exact in e4m3
    torch.testing.assert_close(got.gather(1, idx), x.gather(1, idx), rtol=1e-6, atol=0)


def test_dequantize_to_bf16():
    x = torch.randn(4, D)
    assert dequantize_rows(quantize_rows(x), D, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("key,value", [("dispatch", "once"), ("dispatch_dtype", "fp16")])
def test_bad_dispatch_keys_name_key_value_and_choices(key, value):
    with pytest.raises(ConfigError, match=rf"moe\.{key}='{value}': must be one of"):
        validate_moe(MoEConfig(**{key: value}))
