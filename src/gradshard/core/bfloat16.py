"""bfloat16 without a bfloat16 dtype: numpy has none, so its values travel as their 16-bit patterns (``uint16``).

A bfloat16 is the upper half of a float32 (sign, 8 exponent bits, 7 mantissa bits), so widening is exact: the 16
bits shifted left by 16 are the float32's bits. Narrowing rounds to nearest, ties to even, as torch's
``Tensor.to(torch.bfloat16)`` does; a NaN stays a NaN (its sign kept, made quiet). gradshard carries a bfloat16
model's tensors as float32 in updates and aggregates (see :meth:`ModelLayout.aggregated`); these two functions are
the conversions at the edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.errors import LayoutError


def to_float32(bits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """The float32 values of bfloat16 bit patterns (``uint16`` or ``int16``), exactly."""
    if bits.dtype.itemsize != 2 or bits.dtype.kind not in "iu":
        raise LayoutError(f"bfloat16 bit patterns are 16-bit integers, got {bits.dtype}")
    wide = bits.view(np.uint16).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def from_float32(values: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """The bfloat16 bit patterns (``uint16``) nearest to float32 ``values`` (ties to even, NaN stays NaN)."""
    if values.dtype != np.float32:
        raise LayoutError(f"narrowing to bfloat16 takes float32 values, got {values.dtype}")
    u = np.ascontiguousarray(values).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)
