"""The autograd-aware op: forward and backward registered with torch.library.

`fused_attn::forward` and `fused_attn::backward` are custom ops with fake (meta) implementations,
so torch.compile traces them without graph breaks, and the backward is itself an op, so compiled
graphs keep it opaque too. The backend is chosen in Python before the op is called and travels
as a string argument; the op only runs it.

`attention_op` is what the public functions call: the op while torch.compile, torch.export or
torch.jit.trace traces, or for tensor subclasses; in plain eager calls, an autograd.Function
running the same two implementations. torch.library's autograd wrapper costs ~250 us a call on
torch 2.13 (it rebuilds the schema's argument list once per argument), more than a whole small
attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd import forward_ad

from .backends import get_backend
from .backends.base import needs_backward
from .layout import attention_outputs, gradient_like
from .options import AttentionOptions, AttentionTensors

Tensor = torch.Tensor


def _is_empty(q: Tensor, k: Tensor, opts: AttentionOptions) -> bool:
    if q.dim() == 3:  # packed varlen
        return q.numel() == 0 or k.shape[0] == 0 or opts.max_seqlen_q == 0 or opts.max_seqlen_k == 0
    return q.numel() == 0 or k.shape[2] == 0


def _empty_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs of a call in which no query row sees a key: out = 0, lse = -inf."""
    out, lse = attention_outputs(q, v)
    return out.zero_(), lse.fill_(float("-inf"))


def split_mask(attn_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """attn_mask as AttentionTensors holds it: (mask, None) for a bool one, (None, bias) for a float one."""
    if attn_mask is None:
        return None, None
    return (attn_mask, None) if attn_mask.dtype == torch.bool else (None, attn_mask)


def _forward_impl(
    q: Tensor, k: Tensor, v: Tensor,
    attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_seed: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    scale: float, causal: bool, bottom_right: bool, window_left: int, window_right: int,
    softcap: float, dropout_p: float, deterministic: bool, max_seqlen_q: int, max_seqlen_k: int, backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention by the named backend. Dense shapes as in fused_attn.attention,
    packed ones (cu_seqlens given) as in fused_attn.varlen_attention."""
    opts = AttentionOptions(scale, causal, bottom_right, window_left, window_right, softcap, dropout_p, deterministic,
                            max_seqlen_q, max_seqlen_k)
    extras = AttentionTensors(*split_mask(attn_mask), alibi_slopes, dropout_seed, cu_seqlens_q, cu_seqlens_k)
    return _forward(q, k, v, extras, opts, backend)


def _forward(q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions,
             backend: str) -> tuple[Tensor, Tensor]:
    if _is_empty(q, k, opts):  # no keys: every row is fully masked
        return _empty_outputs(q, v)
    return get_backend(backend).forward(q, k, v, extras, opts)


attention_forward = torch.library.custom_op("fused_attn::forward", _forward_impl, mutates_args=())


@attention_forward.register_fake
def _(q, k, v, *tensors_and_scalars):
    return attention_outputs(q, v)


def _backward_impl(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_seed: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], bias_requires_grad: bool,
    scale: float, causal: bool, bottom_right: bool, window_left: int, window_right: int,
    softcap: float, dropout_p: float, deterministic: bool, max_seqlen_q: int, max_seqlen_k: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias) given the gradients of out and lse; dbias is empty unless requested."""
    opts = AttentionOptions(scale, causal, bottom_right, window_left, window_right, softcap, dropout_p, deterministic,
                            max_seqlen_q, max_seqlen_k)
    if _is_empty(q, k, opts):
        grads = tuple(gradient_like(t).zero_() for t in (q, k, v))
        return (*grads, attn_mask.new_zeros(attn_mask.shape) if bias_requires_grad else q.new_empty(0))
    extras = AttentionTensors(*split_mask(attn_mask), alibi_slopes, dropout_seed, cu_seqlens_q, cu_seqlens_k)
    dq, dk, dv, dbias = get_backend(backend).backward(dout, dlse, q, k, v, out, lse, extras, opts,
                                                      bias_requires_grad)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0))


attention_backward = torch.library.custom_op("fused_attn::backward", _backward_impl, mutates_args=())


@attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed, cu_seqlens_q, cu_seqlens_k,
      bias_requires_grad, *scalars):
    grads = tuple(gradient_like(t) for t in (q, k, v))
    return (*grads, attn_mask.new_empty(attn_mask.shape) if bias_requires_grad else q.new_empty(0))


def _backward_op_not_differentiable(ctx, *grads):
    raise RuntimeError(
        "fused_attn: the gradients of a call through the registered op (torch.jit.trace, torch.compile, "
        "tensor subclasses) cannot be differentiated (a second derivative through attention): the backward "
        "op has no derivative; eager calls with backend='reference' give second derivatives")


# Differentiating the backward op's gradients (create_graph=True) raises fused_attn's explanation
# instead of torch's "no autograd formula was registered".
attention_backward.register_autograd(_backward_op_not_differentiable, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, dropout_seed, cu_seqlens_q, cu_seqlens_k, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed, cu_seqlens_q, cu_seqlens_k)
    ctx.bias_requires_grad = attn_mask is not None and attn_mask.requires_grad
    ctx.scalars = scalars


def _gradients(ctx, dout, dlse, backward):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv, dbias = backward(dout, dlse, q, k, v, out, lse, *tensors, ctx.bias_requires_grad, *ctx.scalars)
    not_differentiable = [None] * (len(tensors) - 1 + len(ctx.scalars))  # all but attn_mask
    return dq, dk, dv, (dbias if ctx.bias_requires_grad else None), *not_differentiable


def _backward(ctx, dout, dlse):
    return _gradients(ctx, dout, dlse, attention_backward)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """attention_forward's autograd, for plain eager calls: the same setup and implementations.
    (forward takes ctx rather than defining setup_context: apply then skips binding the
    arguments to the signature, another ~40 us a call.)"""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"fused_attn: the {ctx.scalars[-1]!r} backend has no forward-mode derivative (forward_ad dual "
            "tensors, torch.func.jvp); backend='reference' computes it, slowly. (torch's SDPA has none either.)")

    @staticmethod
    def backward(ctx, dout, dlse):
        # A batched backward (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)) hands
        # this batched gradients (torch's legacy vmap): the op's fallback loops over the batch.
        batched = torch._C._functorch.is_legacy_batchedtensor
        backward = attention_backward if batched(dout) or batched(dlse) else _backward_impl
        gradients = _gradients(ctx, dout, dlse, backward)
        backend = ctx.scalars[-1]
        if not torch.is_grad_enabled() or get_backend(backend).twice_differentiable:
            return gradients
        # create_graph=True, and autograd cannot record this backward.
        return _not_differentiable(gradients, ctx, dout, dlse, f"the {backend!r} backend's gradients cannot be "
                                   "differentiated (a second derivative through attention, create_graph=True); "
                                   "backend='reference' computes them, slowly")


def _not_differentiable(gradients, ctx, dout, dlse, message: str):
    """The gradients, tied to what they depend on so that differentiating them raises `message`
    instead of silently giving no second-order terms."""
    q, k, v, out, lse, attn_mask, *_ = ctx.saved_tensors
    tensors = [g for g in gradients if g is not None]
    depends_on = [t for t in (q, k, v, attn_mask, dout, dlse) if t is not None and t.requires_grad]
    marked = iter(_NotDifferentiable.apply(message, len(tensors), *tensors, *depends_on))
    return tuple(None if g is None else next(marked) for g in gradients)


class _NotDifferentiable(torch.autograd.Function):
    """The first `count` tensors, copied through; differentiating them raises `message`. (A
    setup_context and a vmap rule, so that torch.func transforms take it too.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, count, *tensors):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"fused_attn: {ctx.message}")


class _TransformableAttention(torch.autograd.Function):
    """attention_forward's autograd as torch.func transforms need it: torch.library's own wrapper
    defines no setup_context, without which they refuse an autograd Function. grad, vjp, jacrev
    and vmap work (vmap loops over the batch through the ops' fallback); a second derivative
    (nested grad; hessian takes forward mode, which it lacks) raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return attention_forward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse):
        # The backward op, to which the transforms' layers hand plain tensors (and vmap its fallback),
        # without grad mode: the op has no autograd formula.
        with torch.no_grad():
            gradients = _gradients(ctx, dout, dlse, attention_backward)
        if not torch.is_grad_enabled():
            return gradients
        return _not_differentiable(gradients, ctx, dout, dlse, "gradients cannot be differentiated under "
                                   "torch.func transforms (a second derivative through attention)")


# Tensors that the eager path takes as they are: plain ones and parameters (a learnable bias).
PLAIN_TENSORS = (Tensor, torch.nn.Parameter)

def needs_the_op(tensors) -> bool:
    """Whether a call with these tensor arguments (q first, None where absent) must go through the
    registered op rather than its implementation: while torch.compile, torch.export or
    torch.jit.trace traces, under torch.func transforms, for tensor subclasses (fake, functional,
    DTensor...), which only the op's registrations handle, and for meta tensors (shapes without
    values, as a model built on the meta device passes: the op's fake implementation answers).
    torch.jit.trace must record the op as one node (whose autograd formula then serves the traced
    module's backward): the implementation's own steps would be recorded instead (values read on
    the host baked in as constants, triton launches failing on traced sizes), and with a gradient
    wanted an autograd.Function node, which trace's check, re-tracing under no_grad, does not
    reproduce. Runs on every call: kept to cheap flag reads and a plain loop over the tensors."""
    if being_traced() or tensors[0].is_meta:
        return True
    for t in tensors:
        if t is not None and type(t) not in PLAIN_TENSORS:
            return True
    return False


def being_traced() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace traces, or torch.func transforms run."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state() is not None)


def _wants_gradient(tensors) -> bool:
    return torch.is_grad_enabled() and needs_backward(*tensors)


@torch.compiler.disable
def _transformed_eagerly(*inputs):
    """_TransformableAttention under torch.func's grad transforms that torch.compile traces, run
    eagerly (a graph break, which fullgraph=True refuses): torch.compile would trace the Function's
    forward as if no gradient were wanted (its tensors are the transforms' wrappers), and
    torch.library's autograd wrapper of the op then meets the transforms, which it does not
    support."""
    return _TransformableAttention.apply(*inputs)


def under_func_transform() -> bool:
    """Inside torch.func transforms (grad, vjp, vmap...), eager or traced by torch.compile."""
    return torch._C._are_functorch_transforms_active()


def attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], extras: AttentionTensors,
                 opts: AttentionOptions, backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse) of a validated call by the named backend: attention_forward where needs_the_op
    says so; else the same implementation, through _EagerAttention when a gradient is wanted, or
    straight to the backend with extras and opts as they are (a small call's time is mostly such
    glue). extras holds attn_mask already split into mask or bias; the op takes attn_mask itself."""
    tensors = (q, k, v, attn_mask, extras.alibi_slopes, extras.dropout_seed, extras.cu_seqlens_q, extras.cu_seqlens_k)
    if under_func_transform():
        if torch.compiler.is_compiling():
            # vmap's batched tensors: the op (its fallback loops over the batch); grad's, eagerly.
            if torch._C._functorch.is_batchedtensor(q):
                return attention_forward(*tensors, *opts, backend)
            return _transformed_eagerly(*tensors, *opts, backend)
        return _TransformableAttention.apply(*tensors, *opts, backend)
    if needs_the_op(tensors):
        return attention_forward(*tensors, *opts, backend)
    if forward_ad._current_level >= 0:
        # Inside forward_ad.dual_level(): dual tensors require no grad, and the kernels would drop
        # their tangents (a silent zero derivative); the Function's jvp says why not. The
        # reference backend's torch operations carry tangents (and gradients) themselves.
        if get_backend(backend).twice_differentiable:
            return _forward(q, k, v, extras, opts, backend)
        return _EagerAttention.apply(*tensors, *opts, backend)
    if _wants_gradient(tensors):
        return _EagerAttention.apply(*tensors, *opts, backend)
    return _forward(q, k, v, extras, opts, backend)
