"""float8 rows on the wire (`moe.dispatch_dtype: fp8`): e4m3 values with one float32 scale per row.

    quantize:   s = max|x_row| / 448 (e4m3's largest finite value);  q = e4m3(x_row / s)
    pack:       [D bytes of q | 4 bytes of s] per row, as uint8 (gloo refuses float8 tensors: "Invalid
                scalar type"; NCCL would take them, but one uint8 layout serves both)
    dequantize: x_row ~ float32(q) * s, in the dtype the caller asks for

Error bound per element (round to nearest; 3 mantissa bits): |x - x~| <= 2^-4 |x| for scaled values in
e4m3's normal range, and <= 2^-10 s below it (subnormal spacing 2^-9): |x - x~| <= max(2^-4 |x|, 2^-10 s).
This is how DeepSeek-V3 dispatches (per-group scales there; one group per row here).

Shape legend: R = rows, D = hidden.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
SCALE_BYTES = 4


def quantize_rows(x_RD: torch.Tensor) -> torch.Tensor:
    """[R, D] float rows -> [R, D + 4] uint8: e4m3 values, then the row's float32 scale."""
    x_RD = x_RD.detach().float()
    # A zero row gets the smallest scale instead of 0 (no 0/0): it quantizes to zeros all the same.
    scale_R1 = (x_RD.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q_RD = (x_RD / scale_R1).to(E4M3)
    return torch.cat([q_RD.view(torch.uint8), scale_R1.view(torch.uint8)], dim=1)


def dequantize_rows(packed_RB: torch.Tensor, hidden: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_rows` up to e4m3 rounding: [R, D + 4] uint8 -> [R, D] rows of `dtype`."""
    q_RD = packed_RB[:, :hidden].contiguous().view(E4M3)
    scale_R1 = packed_RB[:, hidden:hidden + SCALE_BYTES].contiguous().view(torch.float32)
    return (q_RD.float() * scale_R1).to(dtype)
