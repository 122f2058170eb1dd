"""Host time per call: what fused_attn's Python layer costs on calls too small for the kernels to matter.

    python -m benchmarks.bench_overhead          # CUDA if available, else CPU
    python -m benchmarks.bench --suite overhead  # the same through the main entry point

A model calls attention once per layer and step; on small inputs (decoding one token, short
sequences) the host's work per call (checks, backend choice, output allocation, launch) can cost
more than the kernels, and a GPU then waits on the host. Each row times back-to-back calls of one
entry point on tiny inputs and reports the wall time per call, against torch SDPA doing the same
math from the same inputs:
    attention fwd            fused_attn.attention, q, k, v (1, 8, 32, 64), no gradient
    sdpa drop-in fwd         fused_attn.scaled_dot_product_attention (what fused_attn.enable() installs as
                             torch's function, for models that call SDPA) on the fwd inputs
    attention decode         fused_attn.attention, q (1, 8, 1, 64) against k, v (1, 2, 256, 64) (GQA);
                             SDPA with enable_gqa=True
    attention fwd+bwd        the same as fwd with q, k, v requiring grad, then out.backward
    kvcache step             fused_attn.attention_with_kvcache writing one new token into a
                             contiguous (1, 256, 2, 64) cache and attending to its 129 tokens; SDPA:
                             the token written by indexing, then attention over the cache's prefix
    varlen fwd               fused_attn.varlen_attention over 4 packed sequences of 8 tokens; SDPA:
                             the same as a (4, 8, 8, 64) batch
Timing: the time of N calls in a row divided by N (on CUDA synchronized before and after each
round: the tiny kernels finish long before the host issues the next call, so this is the host's
time), over rounds that alternate between the providers: the median, and the best round (on a
shared machine other work only ever adds to a round, so the best is the steadier figure; the
ratio to SDPA is taken from it).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fused_attn
from benchmarks import common

SUITE = "overhead"
B, HQ, HKV, D = 1, 8, 2, 64


def cases(device: str, dtype: torch.dtype) -> dict[str, dict[str, Callable[[], object]]]:
    """{case: {provider: one call}}, inputs drawn once per case (random, never zeros)."""
    def rand(*shape, grad=False):
        return common.rand(shape, device, dtype, requires_grad=grad)

    q, k, v = rand(B, HQ, 32, D), rand(B, HQ, 32, D), rand(B, HQ, 32, D)
    qd, kd, vd = rand(B, HQ, 1, D), rand(B, HKV, 256, D), rand(B, HKV, 256, D)
    qg, kg, vg = (rand(B, HQ, 32, D, grad=True) for _ in range(3))
    dout = rand(B, HQ, 32, D)
    qc, k_cache, v_cache = rand(B, 1, HQ, D), rand(B, 256, HKV, D), rand(B, 256, HKV, D)
    k_new, v_new = rand(B, 1, HKV, D), rand(B, 1, HKV, D)
    cached = torch.full((B,), 128, dtype=torch.int32, device=device)
    seqs, length = 4, 8
    qp, kp, vp = (rand(seqs * length, HQ, D) for _ in range(3))
    cu = torch.arange(0, seqs * length + 1, length, dtype=torch.int32, device=device)

    def backward(out):
        out.backward(dout)
        for t in (qg, kg, vg):
            t.grad = None

    def sdpa_step():
        k_cache[:, 128:129] = k_new
        v_cache[:, 128:129] = v_new
        keys, values = k_cache[:, :129].transpose(1, 2), v_cache[:, :129].transpose(1, 2)
        return F.scaled_dot_product_attention(qc.transpose(1, 2), keys, values, enable_gqa=True)

    def as_batch(t):
        return t.view(seqs, length, HQ, D).transpose(1, 2)

    return {
        "attention fwd": {"fused_attn": lambda: fused_attn.attention(q, k, v),
                          "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)},
        "sdpa drop-in fwd": {"fused_attn": lambda: fused_attn.scaled_dot_product_attention(q, k, v),
                             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)},
        "attention decode": {"fused_attn": lambda: fused_attn.attention(qd, kd, vd),
                             "sdpa": lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)},
        "attention fwd+bwd": {"fused_attn": lambda: backward(fused_attn.attention(qg, kg, vg)),
                              "sdpa": lambda: backward(F.scaled_dot_product_attention(qg, kg, vg))},
        "kvcache step": {"fused_attn": lambda: fused_attn.attention_with_kvcache(qc, k_cache, v_cache, cached,
                                                                                 k=k_new, v=v_new),
                         "sdpa": sdpa_step},
        "varlen fwd": {"fused_attn": lambda: fused_attn.varlen_attention(qp, kp, vp, cu, cu, length, length),
                       "sdpa": lambda: F.scaled_dot_product_attention(as_batch(qp), as_batch(kp), as_batch(vp))},
    }


def host_us_per_call(calls: dict[str, Callable[[], object]], on_cuda: bool, per_round: int,
                     rounds: int) -> dict[str, object]:
    """{provider: (median, best) microseconds per call over the rounds, or the exception it raised}."""
    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    samples: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, object] = {}
    for name, call in calls.items():  # a failing provider is reported in its row (main warmed the rest up)
        try:
            call()
        except Exception as exc:
            results[name] = exc
    for _ in range(rounds):
        for name, call in calls.items():
            if name in results:
                continue
            sync()
            start = time.perf_counter()
            for _ in range(per_round):
                call()
            sync()
            samples[name].append((time.perf_counter() - start) / per_round * 1e6)
    results.update({name: (statistics.median(s), min(s)) for name, s in samples.items() if name not in results})
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    args = p.parse_args(argv)
    device, on_cuda = common.resolve_device(args)
    flav = common.flavour(args, on_cuda)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    per_round, rounds = (20, 3) if flav == "quick" else (200, 15)
    header = common.header_lines("fused_attn benchmark: host time per call", on_cuda, flav)
    print("\n".join(header), flush=True)
    torch.manual_seed(0)
    rows = []
    every_case = cases(device, dtype)
    # Warm-up of every call before any is timed: compilation, thread pools, first-call caches, and
    # this process's own start (the first case timed ran slower than the rest without it).
    for calls in every_case.values():
        for call in calls.values():
            for _ in range(per_round):
                try:
                    call()
                except Exception:  # timed (and reported) below
                    break
    for case, calls in every_case.items():
        if common.out_of_time():
            break
        common.progress(f"{case} ...")
        times = host_us_per_call(calls, on_cuda, per_round, rounds)
        sdpa = times.get("sdpa")
        for provider, us in times.items():
            row = {"case": case, "provider": provider, "dtype": common.dtype_name(dtype), "error": ""}
            if isinstance(us, Exception):
                row["error"] = common.short_error(us)
            else:
                row["us_per_call"], row["best_us_per_call"] = us
                if isinstance(sdpa, tuple):
                    row["time_vs_sdpa"] = us[1] / sdpa[1]
            rows.append(row)
    columns = [common.Column("case", align_right=False), common.Column("provider", align_right=False),
               common.Column("us_per_call", "median us / call", ".1f"),
               common.Column("best_us_per_call", "best us / call", ".1f"),
               common.Column("time_vs_sdpa", "x sdpa's time (best)", ".2f"),
               common.Column("error", align_right=False)]
    body = [f"B={B}, Hq={HQ}, Hkv={HKV}, D={D}, {common.dtype_name(dtype)}; {per_round} calls in a row, median "
            f"and best of {rounds} rounds. 'x sdpa's time': fused_attn's best time per call over SDPA's (lower "
            "is better)."]
    body += [""] + common.markdown_table(rows, columns)
    common.finish(args, on_cuda, SUITE, flav, header, body, rows,
                  ["case", "provider", "dtype", "us_per_call", "best_us_per_call", "time_vs_sdpa", "error"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
