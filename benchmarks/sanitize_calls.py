"""A compact sweep of GPU kernel calls to run under compute-sanitizer (benchmarks/device_check.sh).

Every GPU backend (cuda, triton) runs forward and backward (masks hiding whole tiles included),
and KV-cache decoding (GQA rows sharing blocks, split-KV and its merge, paged caches), over shapes
chosen for the bug classes the CPU interpreter and emulator cannot see: out-of-bounds reads on
ragged tails, races between warps on shared memory, uninitialised reads. Each call is also
compared with the reference backend, so a wrong answer is reported even when the sanitizer is
silent. Exit status 1 when any call fails or disagrees.

    python -m benchmarks.sanitize_calls            # the full sweep (memcheck)
    python -m benchmarks.sanitize_calls --small    # a few calls (racecheck is ~100x slower)
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

import fused_attn
from benchmarks.common import paged_copy

# (Lq, Lk, D, Dv, Hq, Hkv): ragged tails, Lq != Lk, GQA, head-dim buckets, Dv != D.
SHAPES = [(1, 77, 64, 64, 8, 2), (97, 113, 40, 40, 4, 4), (130, 257, 128, 96, 6, 2), (64, 64, 256, 256, 2, 1)]
VARIANTS = [
    dict(),
    dict(causal=True),
    dict(causal=True, causal_alignment="bottom_right"),
    dict(window=(16, 3), softcap=20.0),
    dict(alibi=True, causal=True),
    dict(mask="padding"),
    dict(mask="tiles"),
    dict(bias="heads"),
    dict(dropout_p=0.2),
]


def extras(variant, B, Hq, Lq, Lk, device):
    keywords = {k: v for k, v in variant.items() if k not in ("alibi", "mask", "bias")}
    if variant.get("alibi"):
        keywords["alibi_slopes"] = torch.rand(Hq, device=device)
    if variant.get("mask") == "padding":
        keywords["attn_mask"] = torch.rand(B, 1, 1, Lk, device=device) > 0.3
    if variant.get("mask") == "tiles":  # whole key blocks hidden, which the kernels skip
        mask = torch.rand(B, Hq, Lq, Lk, device=device) > 0.3
        mask[0, :, :, 20:] = False
        mask[:, 0] = False
        keywords["attn_mask"] = mask
    if variant.get("bias") == "heads":
        keywords["attn_mask"] = torch.randn(1, Hq, Lq, Lk, device=device, requires_grad=True)
    return keywords


def check(backend, dtype, shape, variant, device) -> bool:
    rng = torch.cuda if device.type == "cuda" else torch.random
    Lq, Lk, D, Dv, Hq, Hkv = shape
    B = 2
    q = torch.randn(B, Hq, Lq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, device=device, dtype=dtype, requires_grad=True)
    keywords = extras(variant, B, Hq, Lq, Lk, device)
    leaves = [q, k, v] + [t for t in keywords.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    dout = torch.randn(B, Hq, Lq, Dv, device=device, dtype=dtype)
    results = {}
    for name in (backend, "reference"):
        state = rng.get_rng_state()
        out = fused_attn.attention(q, k, v, backend=name, **keywords)
        grads = torch.autograd.grad(out, leaves, dout)
        rng.set_rng_state(state)  # the same dropout mask for both
        results[name] = [out, *grads]
    # Relative to the largest reference value, with a floor: a gradient that is exactly 0 in math
    # (one visible key) is rounding noise in both.
    worst = max(((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-2)).item()
                for a, b in zip(results[backend], results["reference"]))
    ok = worst < (3e-2 if dtype != torch.float32 else 1e-3)  # a bug is off by O(1)
    print(f"{'ok ' if ok else 'BAD'} {backend:7} {str(dtype)[6:]:8} {shape} {variant}: worst relative error {worst:.2e}")
    return ok


# KV-cache decoding (B, Lq, Hq, Hkv, D, capacity, paged): GQA rows sharing blocks, and caches long
# enough to be split across blocks (split-KV and its merge), contiguous and paged.
DECODE_CASES = [(2, 1, 8, 2, 128, 3000, False), (3, 5, 4, 4, 64, 1500, True), (1, 1, 32, 8, 128, 8000, True)]
PAGE = 64


def check_decode(backend, dtype, case, device) -> bool:
    B, Lq, Hq, Hkv, D, capacity, paged = case
    q = torch.randn(B, Lq, Hq, D, device=device, dtype=dtype)
    k_cache = torch.randn(B, capacity, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.randn(B, capacity, Hkv, D, device=device, dtype=dtype)
    lengths = torch.randint(1, capacity + 1, (B,), device=device, dtype=torch.int32)
    table = None
    if paged:  # the same keys in shuffled pages
        k_cache, v_cache, table = paged_copy(k_cache, v_cache, PAGE)
    outs = [fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=table, causal=True,
                                              backend=name) for name in (backend, "reference")]
    worst = ((outs[0].float() - outs[1].float()).abs().max() / (outs[1].float().abs().max() + 1e-2)).item()
    ok = worst < (3e-2 if dtype != torch.float32 else 1e-3)
    print(f"{'ok ' if ok else 'BAD'} {backend:7} {str(dtype)[6:]:8} decode {case}: worst relative error {worst:.2e}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a few calls only")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the sweep on the cpu backend")
    args = parser.parse_args()
    device = torch.device(args.device)
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    backends = [name for name in candidates if name in fused_attn.available_backends()]
    print("backends:", backends)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    shapes, variants = (SHAPES[1:3], VARIANTS[:3]) if args.small else (SHAPES, VARIANTS)
    failures = 0
    for backend, dtype, shape, variant in itertools.product(backends, dtypes, shapes, variants):
        if args.small and dtype == torch.float16:
            continue
        try:
            failures += not check(backend, dtype, shape, variant, device)
        except Exception as error:  # report and go on: one run shows every failing call
            failures += 1
            print(f"ERR {backend} {dtype} {shape} {variant}: {type(error).__name__}: {error}")
    for backend, dtype, case in itertools.product(backends, dtypes, DECODE_CASES[:1] if args.small else DECODE_CASES):
        if args.small and dtype == torch.float16:
            continue
        try:
            failures += not check_decode(backend, dtype, case, device)
        except Exception as error:
            failures += 1
            print(f"ERR {backend} {dtype} decode {case}: {type(error).__name__}: {error}")
    print(f"{failures} failing calls")
    return 1 if failures or not backends else 0


if __name__ == "__main__":
    sys.exit(main())
