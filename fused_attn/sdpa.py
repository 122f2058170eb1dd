"""torch.nn.functional.scaled_dot_product_attention's signature on top of fused_attn.attention,
and the switch that routes torch's own function to it.

`scaled_dot_product_attention` takes torch's arguments with torch's meaning and reshapes them (as
views whenever the strides allow) into the (B, H, L, D) form `attention` wants: leading batch dims
are broadcast and flattened, heads of size 1 are broadcast, GQA is served natively (k and v are
not repeated, unless their head counts differ from each other). `patch_sdpa()` / `enable()` / `disable()` replace the attribute
torch.nn.functional.scaled_dot_product_attention by a wrapper that uses fused_attn when it can
serve the call and torch's original function otherwise.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import threading
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import dispatch, plans
from .api import attention, plan_attention, run_planned
from .autocast import autocast_inputs
from .checks import MAX_HEAD_DIM, SUPPORTED_DTYPES, as_number
from .ops import split_mask, under_func_transform
from .options import AttentionOptions, AttentionTensors

Tensor = torch.Tensor

# torch's builtin, captured when fused_attn is imported (before any patching by us).
_TORCH_SDPA: Callable[..., Tensor] = F.scaled_dot_product_attention


_FLOAT32_MAX = torch.finfo(torch.float32).max


class _Refusal(NamedTuple):
    """Why a call cannot be served: the exception torch would raise, or None for 'valid, unsupported'."""

    error: Optional[type]
    message: str


class _Keywords(NamedTuple):
    """What `attention` is called with besides the tensors, and how to shape its output."""

    causal: bool
    scale: Optional[float]
    dropout_p: float
    zero_output: bool  # dropout_p == 1: torch drops every probability
    out_shape: tuple


class _Plan(NamedTuple):
    """A call rewritten for `attention`: 4-D views, the mask, and the keywords."""

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Optional[Tensor]
    keywords: _Keywords
    # api.plan_attention's (options, backend) for the call; None when fused_attn cannot serve this
    # valid call (_unsupported_reason)
    planned: Optional[tuple] = None


def _heads_to(t: Tensor, heads: int) -> Tensor:
    """(B, h, L, D) -> (B, heads, L, D) where h divides heads: each head repeated heads/h times in place."""
    if t.shape[1] == heads:
        return t
    repeats = heads // t.shape[1]
    if t.shape[1] == 1:
        return t.expand(t.shape[0], heads, *t.shape[2:])  # a stride-0 view
    return t.repeat_interleave(repeats, dim=1)  # only for k, v with different GQA group sizes


class _Recipe(NamedTuple):
    """What _check concludes of a call from its tensors' shapes and its other arguments: how the
    tensors become `attention`'s, and the keywords it takes."""

    rank: int  # every input's leading dims padded to rank - 3
    batch: tuple  # the broadcast leading dims, flattened into `flat`
    flat: int
    heads: int  # query heads, and the heads k and v are brought to
    kv_heads: int
    keywords: _Keywords
    planned: Optional[tuple] = None  # _Plan's, filled in by _plan from the first call's rewritten tensors


def _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Check a call as torch does and rewrite it for `attention`; a _Refusal when it cannot be served.
    The checks' conclusion depends only on the tensors' shapes, dtypes, devices and layouts and the
    other arguments: it is remembered for the calls like it (plans.py)."""
    key_ = plans.signature("scaled_dot_product_attention", (query, key, value, attn_mask),
                           (dropout_p, is_causal, scale, enable_gqa))
    recipe = plans.recall(key_)
    if recipe is not None:
        return _rewrite(recipe, query, key, value, attn_mask)
    recipe = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if isinstance(recipe, _Refusal):
        return recipe
    plan = _rewrite(recipe, query, key, value, attn_mask)
    planned = None
    if _unsupported_reason(plan) is None:
        # Planned once for the calls like this one, which then skip attention's own plan lookup.
        attn_mask, causal = _attention_mask(plan)
        planned = plan_attention(plan.q, plan.k, plan.v, causal, "top_left", plan.keywords.scale, attn_mask,
                                 plan.keywords.dropout_p, (-1, -1), None, 0.0, False, False, None)
    plans.remember(key_, recipe._replace(planned=planned))
    return plan._replace(planned=planned)


def _rewrite(recipe: _Recipe, query, key, value, attn_mask) -> _Plan:
    """The call's tensors as `attention` takes them, by the recipe: views, never copies (but for
    k, v whose head counts differ from each other under GQA, _heads_to)."""
    q, k, v = (t if t.dim() == recipe.rank else t.reshape(_padded(t.shape, recipe.rank))
               for t in (query, key, value))
    q4 = _heads_to(_flat_batch(q, recipe.batch, recipe.flat), recipe.heads)
    k4 = _heads_to(_flat_batch(k, recipe.batch, recipe.flat), recipe.kv_heads)
    v4 = _heads_to(_flat_batch(v, recipe.batch, recipe.flat), recipe.kv_heads)
    mask4 = None if attn_mask is None else _mask_to_4d(attn_mask, recipe.batch, recipe.flat)
    return _Plan(q4, k4, v4, mask4, recipe.keywords, recipe.planned)


def _padded(shape, rank: int) -> tuple:
    """A shape with its leading dims padded with ones to `rank` dims."""
    return (1,) * (rank - len(shape)) + tuple(shape)


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The _Recipe of a call torch would accept, or a _Refusal: torch's error, or why fused_attn
    leaves it to torch."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            return _Refusal(TypeError, f"scaled_dot_product_attention(): argument '{name}' must be Tensor, "
                                       f"not {type(t).__name__}")
    if query.is_nested or key.is_nested or value.is_nested:
        return _Refusal(None, "nested tensors")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        return _Refusal(RuntimeError, "Expected query, key, and value to all be at least 2 dimensional, but got "
                                      f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not (query.dtype == key.dtype == value.dtype):
        return _Refusal(RuntimeError, "Expected query, key, and value to have the same dtype, but got query.dtype: "
                                      f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not (query.device == key.device == value.device):
        return _Refusal(RuntimeError, "Expected query, key, and value to have the same device type, but got "
                                      f"{query.device}, {key.device} and {value.device} instead.")
    if query.shape[-1] != key.shape[-1]:
        return _Refusal(RuntimeError, f"Expected query and key to have the same embedding dim (last dim), got "
                                      f"{query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        return _Refusal(RuntimeError, f"Expected key and value to have the same sequence length (dim -2), got "
                                      f"{key.shape[-2]} and {value.shape[-2]}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return _Refusal(TypeError, f"attn_mask must be a Tensor or None, not {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            return _Refusal(RuntimeError, "Expected attn_mask dtype to be bool or float or to match query dtype, but "
                                          f"got attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
        if attn_mask.dim() < 2:
            return _Refusal(IndexError, f"attn_mask must have at least 2 dimensions, got shape {tuple(attn_mask.shape)}")
    # torch's signature takes doubles, and Python bools are numbers there: dropout_p=True drops all,
    # scale=True is 1.0 (fused_attn.attention itself refuses bools, a likely slip of the keyword).
    dropout_p, scale = as_number(dropout_p), as_number(scale)
    dropout_p = float(dropout_p) if isinstance(dropout_p, bool) else dropout_p
    scale = float(scale) if isinstance(scale, bool) else scale
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        return _Refusal(ValueError, f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        return _Refusal(TypeError, f"is_causal must be a bool, got {is_causal!r}")
    if not isinstance(enable_gqa, bool):
        return _Refusal(TypeError, f"enable_gqa must be a bool, got {enable_gqa!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        return _Refusal(TypeError, f"scale must be a finite number or None, got {scale!r}")
    if scale is not None and abs(scale) > _FLOAT32_MAX:  # (torch computes it, overflowing)
        return _Refusal(None, f"scale must be within float32's range (|scale| <= {_FLOAT32_MAX:.4g}), the kernels' "
                              f"arithmetic, got {scale!r}")

    # Leading dims: (*batch, heads, L, E), every input padded on the left to the same rank.
    rank = max(query.dim(), key.dim(), value.dim(), 3)
    q, k, v = (_padded(t.shape, rank) for t in (query, key, value))
    batch = _broadcast(q[:-3], k[:-3], v[:-3])
    if batch is None:
        return _Refusal(RuntimeError, f"query, key and value batch dims do not broadcast: {q[:-3]}, {k[:-3]} and "
                                      f"{v[:-3]}")
    heads_q, heads_k, heads_v = q[-3], k[-3], v[-3]
    if enable_gqa:
        if heads_k == 0 or heads_v == 0 or heads_q % heads_k or heads_q % heads_v:
            return _Refusal(RuntimeError, "Number of heads in key and value must divide the number of heads in query "
                                          f"(got {heads_q} query, {heads_k} key and {heads_v} value heads)")
        heads = heads_q
        if heads_k != heads_v:  # rare: bring both to the query's head count
            kv_heads = heads_q
        else:
            kv_heads = heads_k
    else:
        heads = (_broadcast((heads_q,), (heads_k,), (heads_v,)) or (None,))[0]
        if heads is None:
            return _Refusal(RuntimeError, f"The size of query heads ({heads_q}) must match key heads ({heads_k}) and "
                                          f"value heads ({heads_v}) at dim -3 unless they are 1; pass enable_gqa=True "
                                          "for grouped-query attention")
        # Shared single k/v heads stay single: that is multi-query attention, served natively.
        kv_heads = 1 if heads_k == heads_v == 1 else heads
    seqlen_q, seqlen_k = q[-2], k[-2]
    out_shape = (*batch, heads, seqlen_q, v[-1])
    if query.dim() == key.dim() == value.dim() == 2:
        out_shape = out_shape[-2:]
        if attn_mask is not None and attn_mask.dim() > 2:  # (torch's (L, S) scores cannot take its dims)
            scores = (seqlen_q, seqlen_k)
            return _Refusal(RuntimeError, f"output with shape {list(scores)} doesn't match the broadcast shape "
                                          f"{list(_broadcast(tuple(attn_mask.shape), scores) or ())}")
    if attn_mask is not None:
        full = (*batch, heads, seqlen_q, seqlen_k)
        if _broadcast(tuple(attn_mask.shape), full) != full:
            return _Refusal(RuntimeError, f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
                                          f"attention scores' shape {full}")
    return _Recipe(rank, batch, math.prod(batch), heads, kv_heads,
                   _Keywords(is_causal, scale, float(dropout_p) if dropout_p < 1 else 0.0, dropout_p >= 1, out_shape))


def _broadcast(*shapes: tuple) -> Optional[tuple]:
    """The shape `shapes` broadcast to, as torch.broadcast_shapes gives it, or None where they do
    not broadcast (torch's function goes through its tracing machinery: ~40 us a call)."""
    result = []
    for sizes in itertools.zip_longest(*(reversed(shape) for shape in shapes), fillvalue=1):
        size = 1
        for n in sizes:
            if n != 1:
                if size != 1 and n != size:
                    return None
                size = n
        result.append(size)
    return tuple(reversed(result))


def _flat_batch(t: Tensor, batch: tuple, flat: int) -> Tensor:
    """t (*t_batch, H, L, E), t_batch broadcastable to `batch`, as (flat, H, L, E): a view, t itself
    when its one batch dim already is the batch."""
    if len(batch) == 1 and t.shape[0] == flat:
        return t
    return t.expand(*batch, *t.shape[-3:]).reshape(flat, *t.shape[-3:])


def _mask_to_4d(mask: Tensor, batch: tuple, flat: int) -> Tensor:
    """A mask broadcastable to (*batch, H, Lq, Lk) as one broadcastable to (flat, H, Lq, Lk), a view if possible."""
    if mask.dim() <= 3:
        return mask
    lead = mask.shape[:-3]
    if all(size == 1 for size in lead):
        return mask.reshape(mask.shape[-3:]).unsqueeze(0)
    lead = (1,) * (len(batch) - len(lead)) + tuple(lead)
    mask = mask.reshape(lead + tuple(mask.shape[-3:]))
    return mask.expand(*batch, *mask.shape[-3:]).reshape(flat, *mask.shape[-3:])


def _attention_mask(plan: _Plan) -> tuple[Optional[Tensor], bool]:
    """The attn_mask and causal flag that `attention` takes for a plan. is_causal with a mask keeps
    both (as torch's fused CPU/CUDA kernels do; its math kernel refuses): their union, as a mask."""
    attn_mask = plan.attn_mask
    if not plan.keywords.causal or attn_mask is None:
        return attn_mask, plan.keywords.causal
    causal = torch.ones(plan.q.shape[2], plan.k.shape[2], dtype=torch.bool, device=plan.q.device).tril()
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal, False
    return torch.where(causal, attn_mask, float("-inf")), False


def _run(plan: _Plan) -> Tensor:
    keywords = plan.keywords
    attn_mask, causal = _attention_mask(plan)
    if plan.planned is not None:
        out, _ = run_planned(plan.q, plan.k, plan.v, attn_mask, None, *plan.planned)
    else:  # a call fused_attn cannot serve (scaled_dot_product_attention raises attention's error for it)
        out = attention(plan.q, plan.k, plan.v, causal=causal, scale=keywords.scale, attn_mask=attn_mask,
                        dropout_p=keywords.dropout_p)
    if keywords.zero_output:
        out = out * 0.0
    return out if out.shape == keywords.out_shape else out.reshape(keywords.out_shape)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed by fused_attn.

    Same signature and semantics as torch's function (torch 2.13):

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E); value: (..., Hk, S, Ev). At least 2-D; the
            leading dims (everything before the last two, heads included) broadcast against each
            other as in torch, e.g. (N, L, E), (B, H, L, E) or (B1, B2, H, L, E). They are flattened
            into the (B, H, L, D) form of `fused_attn.attention` as views whenever the strides
            allow; k/v with a single head shared by all query heads are not expanded (multi-query
            attention is native). dtype float16, bfloat16, float32 (float64 via the reference
            backend); one dtype and device for all three.
        attn_mask: broadcastable to (..., Hq, L, S). bool: True = take part in attention. float
            (float32 or query's dtype): added to the scores (-inf masks); differentiable, its
            gradient has its own broadcast shape.
        dropout_p: probability of dropping an attention probability, in [0, 1] (applied whenever
            > 0, as torch does: pass 0.0 in eval mode). The random stream is fused_attn's (from
            torch's generator, so torch.manual_seed reproduces it), not torch's.
        is_causal: top-left aligned causal mask: query i sees keys j <= i (torch's convention,
            also when L != S). Combined with attn_mask, both apply (as torch's fused kernels do;
            torch's math kernel rejects that combination).
        scale: multiplier of q @ k^T, keyword only; default 1 / sqrt(E).
        enable_gqa: allow Hk (and Hv) to divide Hq: grouped-query attention, served without
            repeating k and v (both are repeated to Hq heads where Hk != Hv). Without it, head counts must be equal or 1 (broadcast), and a
            mismatch raises RuntimeError as torch does.

    Returns:
        (..., Hq, L, Ev) in query's dtype: the broadcast leading shape; (L, Ev) for 2-D inputs.
        Fully masked rows give 0 (as torch 2.13's fused kernels do), never NaN.

    Raises:
        RuntimeError (TypeError, IndexError, ValueError) where torch raises; ValueError/TypeError
        from fused_attn for valid inputs it does not support (head dim > 256); BackendError when no backend can serve the call. Under `patch_sdpa()` such calls
        go to torch's own function instead.
    """
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    plan = _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if isinstance(plan, _Refusal):
        raise (plan.error or ValueError)(plan.message)
    return _run(plan)


def _unsupported_reason(plan: _Plan) -> Optional[str]:
    """Why fused_attn cannot serve a valid call (dtype, head dim, no backend); None when it can
    (_plan then plans it, and nn.MultiheadAttention runs it)."""
    q, k, v = plan.q, plan.k, plan.v
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype}"
    if not (1 <= q.shape[-1] <= MAX_HEAD_DIM and 1 <= v.shape[-1] <= MAX_HEAD_DIM):
        return f"head dims {q.shape[-1]}, {v.shape[-1]} (fused_attn supports 1..{MAX_HEAD_DIM})"
    extras = AttentionTensors(*split_mask(plan.attn_mask))
    opts = AttentionOptions(causal=plan.keywords.causal, dropout_p=plan.keywords.dropout_p)
    forced = dispatch._requested(None)
    names = [forced] if forced is not None else dispatch.preference(q.device)
    for name in names:
        if not dispatch.refusal_reasons(name, q, k, v, extras, opts):
            return None
    return "no fused_attn backend can serve it"


def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    plan = _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    # Inside torch.func transforms too: fused_attn serves grad, vjp, jacrev and vmap but no second
    # derivative (nested grad, hessian), which torch's function gives.
    if isinstance(plan, _Refusal) or plan.planned is None or under_func_transform():
        # What was there before enable() (torch's function) serves it, or raises its own error.
        fallback = _replaced if _replaced is not None else _TORCH_SDPA
        return fallback(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return _run(plan)


_patched_sdpa.__doc__ = (
    "torch.nn.functional.scaled_dot_product_attention routed to fused_attn (installed by fused_attn.enable() "
    "or fused_attn.patch_sdpa()). Calls fused_attn cannot serve go to the function it replaced (torch's).\n\n"
    + (scaled_dot_product_attention.__doc__ or "")
)
_patched_sdpa.__name__ = "scaled_dot_product_attention"
_patched_sdpa.__qualname__ = "scaled_dot_product_attention"
_patched_sdpa.__wrapped__ = _TORCH_SDPA  # type: ignore[attr-defined]
_patched_sdpa._fused_attn_patch = True  # type: ignore[attr-defined]

_lock = threading.Lock()
_replaced: Optional[Callable] = None  # what F.scaled_dot_product_attention was before enable()


def is_enabled() -> bool:
    """True while torch.nn.functional.scaled_dot_product_attention is routed to fused_attn."""
    return F.scaled_dot_product_attention is _patched_sdpa


def enable() -> None:
    """Route torch.nn.functional.scaled_dot_product_attention to fused_attn, until `disable()`.

    Replaces the attribute on the torch.nn.functional module, so every caller that looks it up
    there at call time (torch.nn.MultiheadAttention's slow path, Hugging Face's "sdpa" attention,
    most model code) runs fused_attn; calls fused_attn cannot serve (unsupported dtype or head
    dim, nested tensors, no backend, invalid input) go to the function it replaced (torch's
    original, unless another library had patched it first), which also raises torch's own errors. Code that did ``from torch.nn.functional import
    scaled_dot_product_attention`` before enabling keeps torch's function: it holds its own
    reference. Functions torch.compile compiled before enabling keep what they traced.

    Idempotent: enabling twice is enabling once; see `patch_sdpa` for a scoped, nestable form.
    """
    global _replaced
    with _lock:
        if F.scaled_dot_product_attention is not _patched_sdpa:
            _replaced = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _patched_sdpa


def disable() -> None:
    """Restore what torch.nn.functional.scaled_dot_product_attention was before `enable()`.

    Idempotent. If something else has replaced the attribute since enable(), it is left alone.
    """
    global _replaced
    with _lock:
        if F.scaled_dot_product_attention is _patched_sdpa:
            F.scaled_dot_product_attention = _replaced if _replaced is not None else _TORCH_SDPA
            _replaced = None


@contextlib.contextmanager
def patch_sdpa() -> Iterator[None]:
    """Context manager: torch.nn.functional.scaled_dot_product_attention runs fused_attn inside it.

        with fused_attn.patch_sdpa():
            out = model(x)   # every F.scaled_dot_product_attention call uses fused_attn

    On exit, exceptions included, the state from before entry is restored: nested blocks keep
    the patch until the outermost exits, and a block entered while `enable()` is on leaves it
    on. Process-wide (not per thread). See `enable` for what is and is not routed.
    """
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()
