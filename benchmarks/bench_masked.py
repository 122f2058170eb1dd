"""Masked attention: bool padding mask, float bias with gradient, causal and sliding window, vs torch SDPA.

    python -m benchmarks.bench_masked            # CUDA: B=4, H=16, L=4096, D=128, bf16, fwd and fwd+bwd
    python -m benchmarks.bench --suite masked    # the same through the main entry point
    python -m benchmarks.bench_masked --full --dtype bf16 --seqlen 2048   # CPU: bf16 (AMX tiles), longer
    python -m benchmarks.bench_masked --full --seqlen 4096 --window 1023 --cases plain,window   # a model's window

Cases (each run by fused_attn.attention and by torch SDPA, default backend choice, same inputs):
    plain      no mask
    causal     causal=True flag / SDPA is_causal=True
    window     fused_attn window=(256, 0) flag (--window: another left bound); SDPA gets the same band
               as a (1, 1, L, L) bool mask
    padding    bool key-padding mask (B, 1, 1, L), key lengths uniform in [L/2, L], to both
    bias       float bias (1, H, L, L) in q's dtype with requires_grad, to both: the bias gradient
               (in the bias's own shape) is part of fwd+bwd
fused_attn takes one attn_mask, so the padding mask and the bias are separate cases. On a GPU
whose extension has the CUDA kernels, "fused_attn:cuda" runs every case on the cuda backend too.

Useful FLOPs count only the visible (i, j) pairs: forward 4*B*H*D*pairs, fwd+bwd 3.5x that (the
peers' convention). "cost/FLOP vs plain" = (time / useful FLOPs) of the row over that of the same
provider's plain row: 1.0 means the mask or the skipped tiles cost nothing beyond their share of work.
"vs sdpa" = SDPA time / fused_attn time for the same case and pass (>1: fused_attn faster).
On the CPU the two providers of a case are timed interleaved (common.time_ms_each).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

import fused_attn
from benchmarks import common

SUITE = "masked"
N_SETS = 3


@dataclass
class Case:
    name: str
    fused_kw: dict
    sdpa_kw: dict
    pairs: int  # visible (i, j) pairs, summed over the batch, per head
    grads: list = field(default_factory=list)
    note: str = ""


def shapes(flav: str, on_cuda: bool, dtype_name: Optional[str] = None, seqlen: Optional[int] = None,
           window: Optional[int] = None):
    """(B, H, L, D, dtype, passes, window left) of the flavour; dtype_name, seqlen and window override."""
    if on_cuda:
        B, H, L, D = (1, 16, 1024, 128) if flav == "quick" else (4, 16, 4096, 128)
        dtype, passes, left = torch.bfloat16, ("fwd", "fwd+bwd"), 256
    elif flav == "quick":
        B, H, L, D, dtype, passes, left = 1, 2, 256, 64, torch.float32, ("fwd", "fwd+bwd"), 64
    else:
        passes = ("fwd", "fwd+bwd") if flav == "full" else ("fwd+bwd",)
        B, H, L, D, dtype, left = 1, 4, 1024, 64, torch.float32, 256
    left = left if window is None else window
    return B, H, seqlen or L, D, common.DTYPES[dtype_name] if dtype_name else dtype, passes, left


def make_step(fn, case: Case, pass_: str, sets):
    """One call of fn on the next input set: forward under no_grad, or forward and backward."""
    cycle = itertools.cycle(sets)
    if pass_ == "fwd":
        def step():
            q, k, v, _ = next(cycle)
            with torch.no_grad():
                fn(q, k, v, case)
    else:
        def step():
            q, k, v, dout = next(cycle)
            fn(q, k, v, case).backward(dout)
    return step


def window_pairs(L: int, left: int) -> int:
    """Visible pairs of window (left, 0), top-left aligned, square: query i sees max(0, i-left)..i."""
    return sum(min(i, left) + 1 for i in range(L))


def make_cases(B, H, L, D, dtype, device, left, seed=0) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    cases = [Case("plain", {}, {}, B * L * L),
             Case("causal", {"causal": True}, {"is_causal": True}, B * L * (L + 1) // 2)]
    i = torch.arange(L, device=device)
    band = ((i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left))[None, None]
    cases.append(Case(f"window({left},0)", {"window": (left, 0)}, {"attn_mask": band}, B * window_pairs(L, left),
                      note="SDPA: same band as a (1,1,L,L) bool mask"))
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    pad = (torch.arange(L)[None, :] < lengths[:, None]).to(device)[:, None, None, :]  # (B, 1, 1, L)
    cases.append(Case("padding (B,1,1,L) bool", {"attn_mask": pad}, {"attn_mask": pad}, L * int(lengths.sum()),
                      note=f"key lengths {lengths.tolist()}"))
    bias = common.rand((1, H, L, L), device, dtype, requires_grad=True)
    cases.append(Case("bias (1,H,L,L) grad", {"attn_mask": bias}, {"attn_mask": bias}, B * L * L, grads=[bias]))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--cases", help="comma-separated subset of: plain,causal,window,padding,bias")
    p.add_argument("--dtype", choices=sorted(common.DTYPES),
                   help="instead of the flavour's (the results file then says which: masked-bf16.md)")
    p.add_argument("--seqlen", type=int, help="instead of the flavour's L (results file masked-L<seqlen>.md)")
    p.add_argument("--window", type=int, help="the window case's left bound instead of the flavour's (results "
                                              "file masked-W<window>.md): the cost per useful FLOP of a model's window")
    args = p.parse_args(argv)
    if args.window is not None and args.window < 0:
        p.error(f"--window must be >= 0, got {args.window}")
    device, on_cuda = common.resolve_device(args)
    flav = common.flavour(args, on_cuda)
    B, H, L, D, dtype, passes, left = shapes(flav, on_cuda, args.dtype, args.seqlen, args.window)
    suite = SUITE + "".join(f"-{prefix}{value}" for prefix, value in (("", args.dtype), ("L", args.seqlen),
                                                                      ("W", args.window)) if value is not None)
    header = common.header_lines("fused_attn benchmark: masks, bias, causal, window", on_cuda, flav)
    print("\n".join(header), flush=True)
    print(f"B={B}, H={H}, L={L}, D={D}, {common.dtype_name(dtype)}; passes {', '.join(passes)}", flush=True)

    torch.manual_seed(0)
    cases = make_cases(B, H, L, D, dtype, device, left)
    if args.cases:
        wanted = [s.strip() for s in args.cases.split(",")]
        cases = [c for c in cases if any(c.name.startswith(w) for w in wanted)]
    sets = [tuple(common.rand((B, H, L, D), device, dtype, requires_grad=True) for _ in range(3))
            + (common.rand((B, H, L, D), device, dtype),) for _ in range(N_SETS)]
    qkv_grads = [t for s in sets for t in s[:3]]

    providers = {
        "fused_attn": lambda q, k, v, c: fused_attn.attention(q, k, v, **c.fused_kw),
        "sdpa": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, **c.sdpa_kw),
    }
    if on_cuda and "cuda" in fused_attn.available_backends():  # the fallback's kernels, forced
        providers["fused_attn:cuda"] = lambda q, k, v, c: fused_attn.attention(q, k, v, backend="cuda", **c.fused_kw)
    rows: list[dict] = []
    for case in cases:
        if common.out_of_time():
            break
        for pass_ in passes:
            steps = {pname: make_step(fn, case, pass_, sets) for pname, fn in providers.items()}
            times = common.time_ms_each(steps, on_cuda, grads=qkv_grads + case.grads)
            for t in qkv_grads + case.grads:
                t.grad = None
            for pname, fn in providers.items():
                row = {"case": case.name, "provider": pname, "pass": pass_, "B": B, "H": H, "L": L, "D": D,
                       "dtype": common.dtype_name(dtype), "pairs": case.pairs, "error": ""}
                row["useful_flops"] = 4.0 * H * D * case.pairs * (3.5 if pass_ == "fwd+bwd" else 1.0)
                try:
                    if isinstance(times[pname], Exception):
                        raise times[pname]
                    row["ms"] = times[pname]
                    row["tflops"] = row["useful_flops"] / (row["ms"] * 1e-3) / 1e12
                    if pname.startswith("fused_attn") and pass_ == passes[0]:
                        q, k, v, _ = sets[0]
                        with torch.no_grad():
                            a = fn(q, k, v, case).float()
                            b = providers["sdpa"](q, k, v, case).float()
                        row["max_abs_diff"] = (a - b).abs().max().item()
                except Exception as exc:
                    row["error"] = common.after_error(exc, on_cuda)
                rows.append(row)
                common.progress(f"{case.name:<24} {pname:<11} {pass_:<8} {common.fmt(row.get('ms'))} ms  "
                                f"{common.fmt(row.get('tflops'), '.4g')} useful TFLOP/s"
                                + (f"  ({row['error']})" if row["error"] else ""))

    key = {(r["case"], r["provider"], r["pass"]): r for r in rows}
    for r in rows:
        plain = key.get(("plain", r["provider"], r["pass"]))
        if r.get("ms") and plain and plain.get("ms"):
            r["cost_vs_plain"] = (r["ms"] / r["useful_flops"]) / (plain["ms"] / plain["useful_flops"])
        r["ps_per_flop"] = r["ms"] * 1e9 / r["useful_flops"] if r.get("ms") else None
        s = key.get((r["case"], "sdpa", r["pass"]))
        if r.get("ms") and s and s.get("ms"):
            r["vs_sdpa"] = s["ms"] / r["ms"]

    cols = [common.Column("case", align_right=False), common.Column("provider", align_right=False),
            common.Column("pass", align_right=False), common.Column("ms", "median ms"),
            common.Column("tflops", "useful TFLOP/s", ".2f" if on_cuda else ".4f"),
            common.Column("ps_per_flop", "ps / useful FLOP", ".4g"),
            common.Column("cost_vs_plain", "cost/FLOP vs plain", ".2f"), common.Column("vs_sdpa", "vs sdpa", ".2f"),
            common.Column("max_abs_diff", "max|diff| fwd", ".2e"), common.Column("error", align_right=False)]
    body = [f"B={B}, H={H}, L={L}, D={D}, {common.dtype_name(dtype)}. Useful FLOPs: fwd 4*H*D*(visible pairs), "
            "fwd+bwd 3.5x. cost/FLOP vs plain: (ms / useful FLOPs) over the same provider's plain row. "
            "vs sdpa: SDPA ms / fused_attn ms (>1: fused_attn faster). max|diff|: fused_attn fwd output vs SDPA.", ""]
    body += common.markdown_table(rows, cols)
    notes = [f"- {c.name}: {c.note}" for c in cases if c.note]
    if notes:
        body += ["", "Notes:"] + notes
    keys = ["case", "provider", "pass", "B", "H", "L", "D", "dtype", "pairs", "useful_flops", "ms", "tflops",
            "ps_per_flop", "cost_vs_plain", "vs_sdpa", "max_abs_diff", "error"]
    common.finish(args, on_cuda, suite, flav, header, body, rows, keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
