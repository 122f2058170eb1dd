"""Validation of user input, run before any backend is chosen or any kernel launches.

Every error names the argument and says what was expected, so a wrong call fails loudly in
Python instead of crashing, hanging or returning a silently wrong result inside a kernel.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import host_checks
from .options import CAUSAL_ALIGNMENTS, AttentionOptions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_dense(**tensors) -> None:
    """Each tensor given (None, or not a tensor, is left to the other checks) must be a dense
    (strided) one: nested and sparse tensors have no rows for the kernels to read."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_nested or t.layout != torch.strided):
            kind = "nested" if t.is_nested else f"{t.layout} (sparse)"
            raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shapes=None, names=("q", "k", "v")) -> None:
    """Check that q (B, Hq, Lq, D), k (B, Hkv, Lk, D) and v (B, Hkv, Lk, Dv) fit together.

    shapes: their (B, H, L, D) shapes when the tensors are stored otherwise (a KV cache's
    (B, L, H, D)): the same rules, without building transposed views on every decoding step.
    names: the arguments' names in the messages (a KV cache's k_cache and v_cache)."""
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (batch, heads, seqlen, head_dim), got {_describe(t)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn} and {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{qn}, {kn} and {vn} must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    q_shape, k_shape, v_shape = shapes or (q.shape, k.shape, v.shape)
    batch, heads_q, _, head_dim = q_shape
    k_batch, heads_kv, seqlen_k, k_head_dim = k_shape
    v_batch, v_heads, v_seqlen, v_head_dim = v_shape
    if k_batch != batch or v_batch != batch:
        raise ValueError(f"{qn}, {kn} and {vn} must share the batch size, got {batch}, {k_batch}, {v_batch}")
    if heads_kv != v_heads:
        raise ValueError(f"{kn} and {vn} must have the same number of heads, got {heads_kv} and {v_heads}")
    if seqlen_k != v_seqlen:
        raise ValueError(f"{kn} and {vn} must have the same sequence length, got {seqlen_k} and {v_seqlen}")
    if (heads_q % heads_kv != 0) if heads_kv else heads_q != 0:  # (no heads at all: an empty call, as in torch)
        raise ValueError(
            f"the number of query heads ({heads_q}) must be a multiple of the number of key/value heads "
            f"({heads_kv}) for grouped-query attention"
        )
    if k_head_dim != head_dim:
        raise ValueError(f"{qn} and {kn} must have the same head dim, got {head_dim} and {k_head_dim}")
    for name, dim in ((f"{qn}/{kn}", head_dim), (vn, v_head_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim must be between 1 and {MAX_HEAD_DIM}, got {dim}")


def as_number(value):
    """A real scalar given as a NumPy number or a 0-d tensor (as torch takes them) as a Python
    float; anything else as it is, for the checks to judge."""
    if value is None or type(value) in (float, int, bool):  # the common case, at once
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def _check_bounds(name: str, value, low: float, high: float, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_window(window) -> tuple[int, int]:
    """window as a (left, right) tuple of ints >= -1 (-1: unbounded), or TypeError/ValueError."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window bounds must be >= 0, or -1 for unbounded, got {tuple(window)}")
    return left, right


def make_options(
    q: torch.Tensor,
    *,
    causal: bool,
    causal_alignment: str,
    scale: float | None,
    window=(-1, -1),
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    deterministic: bool,
    reach: int,
) -> AttentionOptions:
    """Check the keyword arguments and resolve their defaults into AttentionOptions.

    reach: Lq + Lk of the longest (query, key) sequence pair the call can hold, or more. A window
    bound that large lets every query see every key on its side, so it is stored as -1 (unbounded):
    the same attention, and the kernels never add a huge bound to an index (sys.maxsize overflowed).
    """
    scale, window, softcap, dropout_p = check_keywords(causal=causal, causal_alignment=causal_alignment, scale=scale,
                                                       window=window, softcap=softcap, dropout_p=dropout_p,
                                                       deterministic=deterministic)
    left, right = (-1 if bound >= reach else bound for bound in window)
    return AttentionOptions(
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
        causal=causal,
        bottom_right=causal_alignment == "bottom_right",
        window_left=left,
        window_right=right,
        softcap=softcap,
        dropout_p=dropout_p,
        deterministic=deterministic,
    )


# The kernels compute in float32: a scale or softcap outside its range would overflow (NaN
# outputs) or round to 0 (a softcap of 0 means none).
_FLOAT32 = torch.finfo(torch.float32)


def check_keywords(*, causal, causal_alignment, scale, window, softcap, dropout_p, deterministic):
    """The keywords every attention call takes, checked without the tensors (nn.Attention checks
    them when it is built): (scale as a float or None, window as (left, right), softcap, dropout_p)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}")
    scale, softcap, dropout_p = as_number(scale), as_number(softcap), as_number(dropout_p)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number or None, got {scale!r}")
        if abs(scale) > _FLOAT32.max:
            raise ValueError(f"scale must be within float32's range (|scale| <= {_FLOAT32.max:.4g}), got {scale!r}")
        scale = float(scale)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    window = check_window(window)
    softcap = _check_bounds("softcap", softcap, 0.0, math.inf)
    if softcap != 0.0 and not _FLOAT32.tiny <= softcap <= _FLOAT32.max:
        raise ValueError(f"softcap must be 0 (none) or a float32 number in [{_FLOAT32.tiny:.4g}, {_FLOAT32.max:.4g}], "
                         f"got {softcap!r}")
    dropout_p = _check_bounds("dropout_p", dropout_p, 0.0, 1.0)
    return scale, window, softcap, dropout_p


def check_attn_mask(attn_mask, q: torch.Tensor, k: torch.Tensor) -> None:
    """attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (B, Hq, Lq, Lk)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    shape = tuple(attn_mask.shape)
    # (== and !=, not `in`: torch.compile specializes a dynamic size on the former only)
    if not 1 <= len(shape) <= 4 or any(m != 1 and m != f for m, f in zip(shape[::-1], full[::-1])):
        raise ValueError(
            f"attn_mask of shape {shape} does not broadcast to (B, Hq, Lq, Lk) = {full}: each of its "
            "trailing dimensions must be 1 or the full size"
        )
    allowed = (torch.bool, q.dtype, torch.float32)
    if attn_mask.dtype not in allowed:
        raise TypeError(f"attn_mask must be bool, {q.dtype} (q's dtype) or float32, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")


def check_alibi_slopes(alibi_slopes, batch: int, heads: int, device: torch.device) -> None:
    """alibi_slopes: float32 of shape (Hq,) or (B, Hq); not differentiated."""
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    shape = tuple(alibi_slopes.shape)
    if not (shape == (heads,) or shape == (batch, heads)):  # (== for torch.compile: see check_attn_mask)
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on q's device {device}, got {alibi_slopes.device}")
    if alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes are not differentiated; pass alibi_slopes.detach()")


def check_packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Packed varlen q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv): checked through
    their (1, H, total, D) views, so every rule of check_qkv applies with the same messages."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions (total_tokens, heads, head_dim) for varlen attention, "
                             f"got {_describe(t)}")
    check_qkv(*(t.transpose(0, 1).unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in (q, k, v)))


def check_cu_seqlens(name: str, cu_seqlens, max_seqlen, max_name: str, device: torch.device,
                     batch: int | None = None) -> None:
    """cu_seqlens: int32 (B + 1,) on `device`; max_seqlen: a non-negative int. Their values are
    check_cu_seqlens_values's."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu_seqlens.shape)}")
    if batch is not None and cu_seqlens.shape[0] != batch + 1:
        raise ValueError(f"{name} must have {batch + 1} entries like cu_seqlens_q, got {cu_seqlens.shape[0]}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name} must be an int, got {max_seqlen!r}")
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be >= 0, got {max_seqlen}")


def check_cu_seqlens_values(name: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> bool:
    """cu_seqlens (as check_cu_seqlens passed it) starts at 0, does not decrease and ends within the
    packed tensor's `total` rows; max_seqlen is at least its longest sequence.

    They are read on the host, when and as often as host_checks.py says: not while torch.compile
    traces or a CUDA graph is captured, once per GPU tensor and version (once per inference-mode
    tensor). Returns whether they were verified; where not, the caller guards the call's results
    (varlen.py, _nan_unless_valid).
    """
    return host_checks.check_once(lambda: _check_boundaries(name, cu_seqlens, total, max_seqlen, max_name),
                                  cu_seqlens.device, ("cu_seqlens", total, max_seqlen), cu_seqlens, guarded=True)


def boundaries_valid(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """_check_boundaries's verdict computed on the device (no sync): a 0-d bool tensor."""
    lengths = torch.diff(cu_seqlens)
    return ((cu_seqlens[0] == 0) & (cu_seqlens[-1] <= total) & (lengths.min() >= 0)
            & (lengths.max() <= max_seqlen))


def _check_boundaries(name: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    """check_cu_seqlens_values's checks, on the values read on the host."""
    bounds = host_checks.read(cu_seqlens)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    if bounds[-1] > total:
        raise ValueError(f"{name} ends at {bounds[-1]}, past the {total} packed tokens")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is shorter than the longest sequence ({max(lengths)})")
