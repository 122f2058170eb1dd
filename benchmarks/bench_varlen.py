"""Packed variable-length batches: fused_attn.varlen_attention vs padded dense attention on the same data.

    python -m benchmarks.bench_varlen            # CUDA: 16k tokens, H=16, D=128, bf16, L in 512..8k
    python -m benchmarks.bench --suite varlen    # the same through the main entry point

For each L, sequence lengths are drawn uniformly in [L/2, L] until the batch holds (about) 16k tokens
(the last sequence fills the remainder if that is at least L/2). Rows:
    varlen            fused_attn.varlen_attention on the packed (total, H, D) tensors, dispatched as
                      usual (the triton backend on CUDA, the cpu (C++) one on CPU)
    varlen reference  (CPU only) the same on the reference backend, sequence by sequence
    dense padded      fused_attn.attention on (B, H, Lmax, D) views of zero-copy padded
                      (B, Lmax, H, D) tensors with a (B, 1, 1, Lmax) bool key-padding mask
    sdpa padded       torch SDPA on the same padded tensors and mask (causal: the mask and the
                      causal triangle combined in one (B, 1, Lmax, Lmax) bool mask)
"us / real token" = time / number of real (unpadded) tokens. Useful FLOPs: 4*H*D*sum(len^2)
(causal: sum len*(len+1)/2) forward, 3.5x for fwd+bwd; "computed TFLOP/s" divides the FLOPs of the
work each kernel was given (padded rows included for the dense rows) by its time: the ratio of
varlen's to dense padded's says how much efficiency the raggedness costs (goal: within 10%).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import random
import sys

import torch
import torch.nn.functional as F

import fused_attn
from benchmarks import common

SUITE = "varlen"
N_SETS = 2


def plan(flav: str, on_cuda: bool):
    """(total tokens, H, D, dtype, max lengths, causal options, passes)."""
    if on_cuda:
        if flav == "quick":
            return 16384, 16, 128, torch.bfloat16, (1024, 4096), (False,), ("fwd", "fwd+bwd")
        return 16384, 16, 128, torch.bfloat16, (512, 1024, 2048, 4096, 8192), (False, True), ("fwd", "fwd+bwd")
    if flav == "quick":
        return 512, 2, 64, torch.float32, (128,), (False,), ("fwd", "fwd+bwd")
    if flav == "small":
        return 2048, 4, 64, torch.float32, (256, 512), (False,), ("fwd", "fwd+bwd")
    return 4096, 4, 64, torch.float32, (256, 512, 1024), (False, True), ("fwd", "fwd+bwd")


def draw_lengths(total: int, L: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lengths, used = [], 0
    while True:
        n = rng.randint(L // 2, L)
        if used + n > total:
            break
        lengths.append(n)
        used += n
    if total - used >= L // 2:
        lengths.append(total - used)
    return lengths


def pairs(lengths, causal: bool) -> int:
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def make_data(lengths, H, D, dtype, device):
    """Packed leaves (q, k, v, dout) and padded leaves built from the same values."""
    T, B, Lmax = sum(lengths), len(lengths), max(lengths)
    packed = [common.rand((T, H, D), device, dtype) for _ in range(4)]
    # where each packed token sits in the padded (B * Lmax) rows
    index = torch.cat([torch.arange(n) + b * Lmax for b, n in enumerate(lengths)]).to(device)
    padded = []
    for t in packed:
        full = common.rand((B * Lmax, H, D), device, dtype)  # padding rows random too (never zeros)
        full[index] = t
        padded.append(full.reshape(B, Lmax, H, D).detach())
    q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(packed))
    qd, kd, vd, doutd = (t.requires_grad_(i < 3) for i, t in enumerate(padded))
    return {"packed": (q, k, v, dout), "padded": (qd, kd, vd, doutd), "index": index}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    args = p.parse_args(argv)
    device, on_cuda = common.resolve_device(args)
    flav = common.flavour(args, on_cuda)
    total, H, D, dtype, maxlens, causals, passes = plan(flav, on_cuda)
    header = common.header_lines("fused_attn benchmark: varlen (packed) vs padded dense", on_cuda, flav)
    print("\n".join(header), flush=True)
    print(f"~{total} tokens, H={H}, D={D}, {common.dtype_name(dtype)}, lengths uniform in [L/2, L], "
          f"L in {list(maxlens)}", flush=True)

    torch.manual_seed(0)
    rows: list[dict] = []
    for L in maxlens:
        if common.out_of_time():
            break
        lengths = draw_lengths(total, L, seed=L)
        T, B, Lmax = sum(lengths), len(lengths), max(lengths)
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)
        pad = (torch.arange(Lmax)[None, :] < torch.tensor(lengths)[:, None]).to(device)  # (B, Lmax)
        try:
            sets = [make_data(lengths, H, D, dtype, device) for _ in range(N_SETS)]
        except Exception as exc:
            err = common.after_error(exc, on_cuda)
            rows.append({"L": L, "provider": "all", "error": f"inputs: {err}"})
            continue
        grads = [t for s in sets for key in ("packed", "padded") for t in s[key][:3]]
        for causal in causals:
            key_mask = pad[:, None, None, :]
            sdpa_mask = key_mask if not causal else key_mask & torch.ones(Lmax, Lmax, dtype=torch.bool,
                                                                          device=device).tril()[None, None]

            def varlen(s, causal=causal, backend=None):
                q, k, v, _ = s["packed"]
                return fused_attn.varlen_attention(q, k, v, cu, cu, Lmax, Lmax, causal=causal, backend=backend)

            def dense(s, causal=causal):
                q, k, v = (t.transpose(1, 2) for t in s["padded"][:3])
                return fused_attn.attention(q, k, v, causal=causal, attn_mask=key_mask).transpose(1, 2)

            def sdpa(s):
                q, k, v = (t.transpose(1, 2) for t in s["padded"][:3])
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask).transpose(1, 2)

            provs = {"varlen": (varlen, "packed"), "dense padded": (dense, "padded"), "sdpa padded": (sdpa, "padded")}
            if not on_cuda:
                provs["varlen reference"] = (functools.partial(varlen, backend="reference"), "packed")
            useful = 4.0 * H * D * pairs(lengths, causal)
            computed_dense = 4.0 * H * D * B * (Lmax * (Lmax + 1) // 2 if causal else Lmax * Lmax)
            for pass_ in passes:
                mult = 3.5 if pass_ == "fwd+bwd" else 1.0
                for name, (fn, kind) in provs.items():
                    row = {"L": L, "causal": causal, "pass": pass_, "provider": name, "B": B, "tokens": T,
                           "Lmax": Lmax, "H": H, "D": D, "dtype": common.dtype_name(dtype), "error": "",
                           "useful_flops": useful * mult,
                           "computed_flops": (useful if kind == "packed" else computed_dense) * mult}
                    cycle = itertools.cycle(sets)
                    if pass_ == "fwd":
                        def step(fn=fn, cycle=cycle):
                            with torch.no_grad():
                                fn(next(cycle))
                    else:
                        def step(fn=fn, kind=kind, cycle=cycle):
                            s = next(cycle)
                            fn(s).backward(s[kind][3])
                    try:
                        row["ms"] = common.time_ms(step, on_cuda, grads=grads)
                        sec = row["ms"] * 1e-3
                        row["us_per_token"] = row["ms"] * 1e3 / T
                        row["useful_tflops"] = row["useful_flops"] / sec / 1e12
                        row["computed_tflops"] = row["computed_flops"] / sec / 1e12
                        if pass_ == passes[0]:
                            s = sets[0]
                            with torch.no_grad():
                                out = fn(s).float()
                                ref = varlen(s).float()
                            if kind == "padded":
                                out = out.reshape(B * Lmax, H, D)[s["index"]]
                            row["max_abs_diff"] = (out - ref).abs().max().item()
                    except Exception as exc:
                        row["error"] = common.after_error(exc, on_cuda)
                    for t in grads:
                        t.grad = None
                    rows.append(row)
                    common.progress(f"L={common.fmt_len(L):<4} causal={causal!s:<5} {pass_:<8} {name:<13} "
                                    f"{common.fmt(row.get('ms'))} ms {common.fmt(row.get('us_per_token'), '.4g')} "
                                    "us/token" + (f"  ({row['error']})" if row["error"] else ""))
        del sets
        if on_cuda:
            torch.cuda.empty_cache()

    key = {(r["L"], r.get("causal"), r.get("pass"), r["provider"]): r for r in rows}
    worst_token, worst_eff = [], []
    for r in rows:
        v = key.get((r["L"], r.get("causal"), r.get("pass"), "varlen"))
        if r.get("ms") and v and v.get("ms"):
            r["varlen_speedup"] = r["ms"] / v["ms"]  # >1: varlen faster than this row
        d = key.get((r["L"], r.get("causal"), r.get("pass"), "dense padded"))
        if r["provider"] == "varlen" and r.get("ms") and d and d.get("ms"):
            worst_token.append(r["ms"] / d["ms"])
            worst_eff.append(r["computed_tflops"] / d["computed_tflops"])

    cols = [common.Column("L"), common.Column("causal", align_right=False), common.Column("pass", align_right=False),
            common.Column("provider", align_right=False), common.Column("B"), common.Column("tokens"),
            common.Column("Lmax"), common.Column("ms", "median ms"),
            common.Column("us_per_token", "us / real token", ".4g"),
            common.Column("useful_tflops", "useful TFLOP/s", ".2f" if on_cuda else ".4f"),
            common.Column("computed_tflops", "computed TFLOP/s", ".2f" if on_cuda else ".4f"),
            common.Column("varlen_speedup", "row ms / varlen ms", ".2f"),
            common.Column("max_abs_diff", "max|diff| vs varlen", ".2e"), common.Column("error", align_right=False)]
    body = [f"~{total} real tokens, H={H}, D={D}, {common.dtype_name(dtype)}; lengths uniform in [L/2, L]. "
            "useful TFLOP/s counts only real pairs; computed TFLOP/s counts the work the kernel was given "
            "(padding included for dense rows). row ms / varlen ms > 1: varlen is faster.", ""]
    body += common.markdown_table(rows, cols)
    body += ["", "Goals (worst configuration counts):"]
    body.append(common.goal_line("varlen time per real token / dense padded's", max(worst_token) if worst_token else None,
                                 1.1, higher_is_better=False))
    body.append(common.goal_line("varlen computed TFLOP/s / dense padded's (efficiency kept despite ragged lengths)",
                                 min(worst_eff) if worst_eff else None, 0.9, higher_is_better=True))
    if not on_cuda:
        body.append("- (CPU: informational; the goals are for the GPU)")

    keys = ["L", "causal", "pass", "provider", "B", "tokens", "Lmax", "H", "D", "dtype", "useful_flops",
            "computed_flops", "ms", "us_per_token", "useful_tflops", "computed_tflops", "varlen_speedup",
            "max_abs_diff", "error"]
    common.finish(args, on_cuda, SUITE, flav, header, body, rows, keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
