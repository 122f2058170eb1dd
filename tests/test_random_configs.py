"""Random combinations of the keywords, shapes and layouts, against float64 math.

The other files check each feature on a matrix chosen by hand. This one draws configurations that
no one chose: GQA with a window and a broadcast bias in bf16, a padding mask with ALiBi and dropout
on sequence-major views, lengths that cross block boundaries anywhere. A fresh seed each run
(printed with a failure, as `torch.manual_seed(...)`) draws both the configuration and the inputs,
and the failure message names the configuration.
"""
import random

import pytest
import torch

from conftest import DEVICE
from oracle import check_against_oracle

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Longest sequences drawn: the interpreter runs every program of a Triton kernel in Python.
MAX_LENGTH = {"triton": 160} if DEVICE.type == "cpu" else {}


def draw_mask(rng: random.Random, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype):
    """None, a bool mask (key padding runs, or scattered flags) or a float bias (learnable or not),
    each of a shape broadcastable to (B, Hq, Lq, Lk)."""
    shape = [rng.choice([1, batch]), rng.choice([1, heads]), rng.choice([1, seqlen_q]), rng.choice([1, seqlen_k])]
    kind = rng.choice(["none", "none", "padding", "flags", "bias"])
    if kind == "padding":
        lengths = torch.randint(0, seqlen_k + 1, (shape[0], 1, 1, 1), device=DEVICE)
        return (torch.arange(seqlen_k, device=DEVICE) < lengths).expand(shape[0], shape[1], 1, seqlen_k).clone()
    if kind == "flags":
        return torch.rand(*shape, device=DEVICE) < rng.uniform(0.05, 0.95)
    if kind == "bias":
        bias = torch.randn(*shape, dtype=rng.choice([torch.float32, dtype]), device=DEVICE)
        return bias.requires_grad_(rng.random() < 0.6)
    return None


def draw_config(rng: random.Random, max_length: int) -> tuple[tuple, torch.dtype, bool, dict]:
    """(shape (B, Hq, Hkv, Lq, Lk, D, Dv), dtype, sequence-major, keywords of fused_attn.attention)."""
    batch, heads_kv = rng.choice([1, 2]), rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 2, 3])
    longest = max_length if rng.random() < 0.5 else 40
    seqlen_q, seqlen_k = rng.randint(1, longest), rng.randint(1, longest)
    head_dim = rng.choice([8, 24, 32, 64, 64, 96, 128])
    head_dim_v = rng.choice([head_dim, head_dim, 16, 80])
    dtype = rng.choice(DTYPES)
    keywords = {"causal_alignment": rng.choice(["top_left", "bottom_right"])}
    if rng.random() < 0.4:
        keywords["causal"] = True
    if rng.random() < 0.35:
        keywords["window"] = (rng.choice([-1, rng.randint(0, max_length)]), rng.choice([-1, rng.randint(0, max_length)]))
    if rng.random() < 0.2:
        keywords["softcap"] = rng.uniform(2.0, 30.0)
    if rng.random() < 0.2:
        keywords["alibi_slopes"] = torch.rand(*rng.choice([(heads_q,), (batch, heads_q)]), device=DEVICE)
    if rng.random() < 0.15:
        keywords["scale"] = rng.uniform(0.05, 0.5)
    if rng.random() < 0.15:
        keywords["dropout_p"] = rng.uniform(0.05, 0.4)
    mask = draw_mask(rng, batch, heads_q, seqlen_q, seqlen_k, dtype)
    if mask is not None:
        keywords["attn_mask"] = mask
    shape = (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v)
    return shape, dtype, rng.random() < 0.3, keywords


def describe(shape, dtype, sequence_major, keywords) -> str:
    def value(v):
        if isinstance(v, torch.Tensor):
            return f"{v.dtype} {tuple(v.shape)}" + (" learnable" if v.requires_grad else "")
        return f"{v:.3g}" if isinstance(v, float) else repr(v)

    items = ", ".join(f"{key}={value(v)}" for key, v in keywords.items())
    return f"(B, Hq, Hkv, Lq, Lk, D, Dv)={shape} {dtype} sequence_major={sequence_major} {items}"


@pytest.mark.parametrize("draw", range(6))
def test_random_configuration_matches_float64_math(variant_backend, draw, fresh_seed):
    rng = random.Random(fresh_seed * 8 + draw)
    shape, dtype, sequence_major, keywords = draw_config(rng, MAX_LENGTH.get(variant_backend, 300))
    try:
        check_against_oracle(variant_backend, shape, dtype, DEVICE, sequence_major=sequence_major, **keywords)
    except AssertionError as error:
        raise AssertionError(f"{describe(shape, dtype, sequence_major, keywords)}: {error}") from error
