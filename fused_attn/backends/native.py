"""Loading fused_attn's compiled extension (fused_attn._native, built from csrc/ by setup.py).

Importing it registers the torch.ops.fused_attn_native ops. It is loaded on first use, not at
`import fused_attn`; when it is missing or fails to load, the reason is kept (backends report it
as their `unavailable_reason`) and a warning says it once, so a broken build never goes unnoticed
yet the package keeps working on its other backends.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

_state: dict[str, Optional[str]] = {}


def load_error() -> Optional[str]:
    """None when the extension is loaded (loading it on the first call); else why it is not."""
    if "error" not in _state:
        _state["error"] = _load()
        if _state["error"] is not None:
            warnings.warn(f"fused_attn: the C++ extension is unavailable ({_state['error']}); "
                          "CPU calls use the next backend", stacklevel=3)
    return _state["error"]


def _load() -> Optional[str]:
    try:
        importlib.import_module("fused_attn._native")
    except ImportError as error:
        if getattr(error, "name", None) == "fused_attn._native":
            return ("fused_attn._native is not built (run `pip install --no-build-isolation --no-deps -e .` "
                    "or `make env`)")
        return f"fused_attn._native failed to load: {error}"
    except OSError as error:  # e.g. a missing shared library
        return f"fused_attn._native failed to load: {error}"
    return None
