"""Dtype facts shared by the write and read sides (NumPy only: no pyarrow import)."""

from __future__ import annotations

import numpy as np

__all__ = ["is_ml_dtype"]


def is_ml_dtype(dtype: np.dtype) -> bool:
    """bfloat16, float8_* and friends from ml_dtypes (recognised without importing it).

    Their ``kind`` varies by type and version ('V' for bfloat16, 'f' for float8), so
    they are told apart by module; Arrow knows none of them.
    """
    return dtype.type.__module__.startswith("ml_dtypes")

