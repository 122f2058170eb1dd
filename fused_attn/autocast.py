"""torch.autocast for fused_attn's entry points, as torch applies it to its SDPA (a lower-precision op)."""
from __future__ import annotations

from typing import Optional

import torch


def autocast_inputs(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """The tensors as torch.autocast hands them to scaled_dot_product_attention: inside an autocast
    region for the first tensor's device, every floating tensor but float64 ones is cast to the
    region's dtype (a float mask included); outside one, or for other tensors, as they are.
    Custom Python functions get no such cast from torch's dispatcher, so the entry points apply it."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors
    device_type = first.device.type
    # Devices autocast has no region for (meta: shapes only) would make is_autocast_enabled raise.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)
