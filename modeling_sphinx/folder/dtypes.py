"""The dtypes that commands and recipes name as text (`--dtype bfloat16`, `dtype: float32`), in one table."""

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = ("float32", "bfloat16", "float16")  # what a model folder is written and loaded in


def dtype_named(name: str, allowed=STORAGE_DTYPES, what: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`, or a `ValueError` that lists the allowed names."""
    if name not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {name!r}")
    return DTYPES[name]
