"""Decoding: fused_attn.attention_with_kvcache (contiguous and paged caches) vs torch SDPA, as bandwidth.

    python -m benchmarks.bench_decode            # CUDA: B in {1,4,16}, Hq=32, Hkv=8, D=128, bf16, Lq=1,
                                                 # cache 4k..128k, page 256
    python -m benchmarks.bench --suite decode    # the same through the main entry point
    python -m benchmarks.bench_decode --dtype bf16 --gpu-heads   # CPU: bf16 caches, Hq=32, Hkv=8, D=128
                                                 # (the CPU default: fp32, Hq=8, Hkv=2, D=64)

Rows, per batch size B and cache length L (every cache full: cache_seqlens = L):
    fused_attn contig     attention_with_kvcache on a contiguous (B, L, Hkv, D) cache (the public
                          call, its checks included), dispatched as usual: the triton backend on
                          CUDA, the cpu (C++) one on CPU. Every call passes the same cache_seqlens,
                          so on GPUs its host check (a sync) runs once, as for the layers of one
                          decoding step (README, Host checks)
    fused_attn paged      the same data in a paged cache (pages of 256, shuffled across the pool)
    fused_attn op only    the backend's kernel call on the contiguous cache, without the Python
                          checks and the backend choice (private API, Backend.kvcache_forward)
    fused_attn unchecked  (CUDA only) the contiguous call with FUSED_ATTN_HOST_CHECKS=0: no host
                          check of the lengths at all (the contig row's cost of the remembered one)
    fused_attn step       a whole decoding step: the cache holds L - 1 tokens, and the call writes
                          the new token's k and v (k=, v=) at position L - 1 and attends to all L
    fused_attn dense      fused_attn.attention on (B, H, L, D) views of the contiguous cache, as a
                          model without a cache API calls it (transformers, patched SDPA): on GPUs
                          the triton backend takes such few-query calls to the decoding kernel
    fused_attn reference  (CPU only) the public call on the reference backend, sequence by sequence
    fused_attn cuda       (CUDA, where the extension has the CUDA kernels) the contiguous call on
                          the cuda backend, the fallback for GPUs without Triton
    sdpa gqa              torch SDPA, q (B, 32, 1, D) vs k/v (B, 8, L, D) views of the contiguous
                          cache, enable_gqa=True, torch's backend choice
    sdpa grouped          torch SDPA with the 4 query heads of a group as 4 query rows:
                          q (B, 8, 4, D) vs k/v (B, 8, L, D), exact for Lq=1, no copies
    sdpa grouped step     the step with torch alone: the new k and v assigned to the caches'
                          position L - 1 (two indexed writes), then sdpa grouped
Bandwidth = bytes of K and V read (2*B*L*Hkv*D*elem) / median time; "% copy" relates it to the
device-to-device copy bandwidth measured at the start ((bytes read + written) / time of a 1 GiB copy).
Caches rotate among random sets, one rotation shared by all providers: 3 on GPUs (do_bench also
flushes the L2 cache between calls), on the CPU as many as make 256 MiB, so each call reads its
cache from memory as a decoding step does. A row whose caches would exceed --mem-budget-gib (60)
is skipped.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

import fused_attn
from benchmarks import common
from fused_attn import host_checks
from fused_attn.backends import get_backend
from fused_attn.options import AttentionOptions

SUITE = "decode"
PAGE = 256
CPU_ROTATION_BYTES = 256 << 20  # several times any CPU's last-level cache


GPU_HEADS = (32, 8, 128)  # Hq, Hkv, D of the GPU sweep (the shape)


def plan(flav: str, on_cuda: bool, dtype_name: Optional[str] = None, gpu_heads: bool = False):
    """(batches, cache lengths, Hq, Hkv, D, dtype) of the flavour; on the CPU dtype_name and
    gpu_heads (the GPU sweep's Hq, Hkv, D) override its heads and dtype."""
    if on_cuda:
        Hq, Hkv, D, dtype = *GPU_HEADS, torch.bfloat16
        if flav == "quick":
            return (1, 4), (4096, 32768), Hq, Hkv, D, dtype
        return (1, 4, 16), tuple(4096 << i for i in range(6)), Hq, Hkv, D, dtype  # 4k..128k
    Hq, Hkv, D = GPU_HEADS if gpu_heads else (8, 2, 64)
    dtype = common.DTYPES[dtype_name or "fp32"]
    if flav == "quick":
        return (1, 2), (512,), Hq, Hkv, D, dtype
    if flav == "small":
        return (1, 4), (1024, 4096), Hq, Hkv, D, dtype
    return (1, 4, 16), (1024, 4096, 16384), Hq, Hkv, D, dtype


def make_set(B, L, Hkv, Hq, D, dtype, device, g):
    kc = common.rand((B, L, Hkv, D), device, dtype)
    vc = common.rand((B, L, Hkv, D), device, dtype)
    q = common.rand((B, 1, Hq, D), device, dtype)
    kp, vp, table = common.paged_copy(kc, vc, PAGE, g)
    # A decoding step's new token, written at position L - 1 by the "step" rows: the values already
    # there, so that the caches every provider reads stay as they are.
    new = {"k_new": kc[:, -1:].clone(), "v_new": vc[:, -1:].clone(),
           "cached": torch.full((B,), L - 1, dtype=torch.int32, device=device)}
    return {"q": q, "kc": kc, "vc": vc, "kp": kp, "vp": vp, "table": table, **new}


def providers(on_cuda: bool, Hkv: int, Hq: int):
    backend = "triton" if on_cuda else "cpu"
    G = Hq // Hkv

    def contig(s, seqlens):
        return fused_attn.attention_with_kvcache(s["q"], s["kc"], s["vc"], seqlens)

    def paged(s, seqlens):
        return fused_attn.attention_with_kvcache(s["q"], s["kp"], s["vp"], seqlens, block_table=s["table"])

    def op_only(s, seqlens):
        # private: the backend's kernel call, without the Python checks and the backend choice
        opts = AttentionOptions(scale=s["q"].shape[-1] ** -0.5, bottom_right=True)
        return get_backend(backend).kvcache_forward(s["q"], s["kc"], s["vc"], seqlens, None, None, opts)[0]

    def sdpa_gqa(s, seqlens):
        q, k, v = s["q"].transpose(1, 2), s["kc"].transpose(1, 2), s["vc"].transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)

    def sdpa_grouped(s, seqlens):
        B, _, _, D = s["q"].shape
        q = s["q"].reshape(B, Hkv, G, D)  # query head h = kv_head * G + g
        out = F.scaled_dot_product_attention(q, s["kc"].transpose(1, 2), s["vc"].transpose(1, 2))
        return out.reshape(B, 1, Hq, D)

    def contig_unchecked(s, seqlens):
        # the environment variable set around the call (~2 us of the row's time)
        os.environ[host_checks.VARIABLE] = "0"
        try:
            return contig(s, seqlens)
        finally:
            del os.environ[host_checks.VARIABLE]

    def dense(s, seqlens):
        q, k, v = s["q"].transpose(1, 2), s["kc"].transpose(1, 2), s["vc"].transpose(1, 2)
        return fused_attn.attention(q, k, v).transpose(1, 2)

    def step(s, seqlens):
        return fused_attn.attention_with_kvcache(s["q"], s["kc"], s["vc"], s["cached"], k=s["k_new"], v=s["v_new"])

    def sdpa_grouped_step(s, seqlens):
        s["kc"][:, -1:] = s["k_new"]
        s["vc"][:, -1:] = s["v_new"]
        return sdpa_grouped(s, seqlens)

    def cuda_contig(s, seqlens):
        return fused_attn.attention_with_kvcache(s["q"], s["kc"], s["vc"], seqlens, backend="cuda")

    def reference(s, seqlens):
        return fused_attn.attention_with_kvcache(s["q"], s["kc"], s["vc"], seqlens, backend="reference")

    provs = {"fused_attn contig": contig, "fused_attn paged": paged, "fused_attn op only": op_only,
             "fused_attn step": step, "fused_attn dense": dense}
    if not on_cuda:
        provs["fused_attn reference"] = reference
    else:
        provs["fused_attn unchecked"] = contig_unchecked
        if "cuda" in fused_attn.available_backends():
            provs["fused_attn cuda"] = cuda_contig
    return {**provs, "sdpa gqa": sdpa_gqa, "sdpa grouped": sdpa_grouped, "sdpa grouped step": sdpa_grouped_step}


def make_steps(provs, sets, seqlens):
    """One step per provider, all drawing from one rotation of the input sets: each call takes the
    set after the previous call's, whichever provider made it. Interleaved (CPU) timing calls the
    providers in turn, and with a rotation per provider each would read the set that the one
    before it had just brought into the caches: every provider but the first timed warm."""
    rotation = itertools.cycle(sets)
    return {name: (lambda fn=fn: fn(next(rotation), seqlens)) for name, fn in provs.items()}


def set_count(per_set: int, on_cuda: bool, budget_bytes: float) -> int:
    """How many input sets to rotate: 3 on GPUs (do_bench also flushes the L2 cache between
    calls); on the CPU enough that they outgrow its last-level cache (CPU_ROTATION_BYTES), so
    that a call reads its cache from memory as a decoding step does; at most what fits the budget."""
    wanted = 3 if on_cuda else max(3, -(-CPU_ROTATION_BYTES // per_set))
    return min(wanted, int(budget_bytes // per_set))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--mem-budget-gib", type=float, default=60.0, help="skip rows whose caches need more")
    p.add_argument("--dtype", choices=sorted(common.DTYPES),
                   help="CPU: instead of fp32 (the results file then says which: decode-bf16-small.md)")
    p.add_argument("--gpu-heads", action="store_true",
                   help=f"CPU: the GPU sweep's Hq, Hkv, D = {GPU_HEADS} instead of (8, 2, 64) (decode-gpu-heads-...)")
    args = p.parse_args(argv)
    device, on_cuda = common.resolve_device(args)
    flav = common.flavour(args, on_cuda)
    if on_cuda and (args.dtype or args.gpu_heads):
        raise SystemExit("--dtype and --gpu-heads are for the CPU sweep (the GPU sweep is bf16 at those heads)")
    batches, seqlens, Hq, Hkv, D, dtype = plan(flav, on_cuda, args.dtype, args.gpu_heads)
    suite = SUITE + (f"-{args.dtype}" if args.dtype else "") + ("-gpu-heads" if args.gpu_heads else "")
    elem = torch.empty((), dtype=dtype).element_size()
    header = common.header_lines("fused_attn benchmark: KV-cache decoding", on_cuda, flav)
    print("\n".join(header), flush=True)
    print(f"Hq={Hq}, Hkv={Hkv}, D={D}, {common.dtype_name(dtype)}, Lq=1, page {PAGE}; B in {batches}, "
          f"L in {[common.fmt_len(L) for L in seqlens]}", flush=True)

    copy_gbs = None
    try:
        copy_gbs = common.copy_bandwidth_gbs(device, on_cuda)
        common.progress(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    except Exception as exc:
        common.progress(f"copy bandwidth: n/a ({common.after_error(exc, on_cuda)})")

    provs = providers(on_cuda, Hkv, Hq)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows: list[dict] = []
    for B in batches:
        for L in seqlens:
            if common.out_of_time():
                break
            kv_bytes = 2 * B * L * Hkv * D * elem
            per_set = 2 * kv_bytes  # contiguous + paged copies
            n_sets = set_count(per_set, on_cuda, args.mem_budget_gib * 2**30)
            base = {"B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": common.dtype_name(dtype),
                    "kv_bytes": kv_bytes, "error": ""}
            if n_sets < 1:
                for name in provs:
                    rows.append(dict(base, provider=name,
                                     error=f"skipped: caches need {per_set / 2**30:.2f} GiB > budget"))
                continue
            try:
                sets = [make_set(B, L, Hkv, Hq, D, dtype, device, g) for _ in range(n_sets)]
                seqlens_t = torch.full((B,), L, dtype=torch.int32, device=device)
            except Exception as exc:
                err = common.after_error(exc, on_cuda)
                for name in provs:
                    rows.append(dict(base, provider=name, error=f"inputs: {err}"))
                continue
            ref = None
            steps = make_steps(provs, sets, seqlens_t)
            times = common.time_ms_each(steps, on_cuda)
            for name, fn in provs.items():
                row = dict(base, provider=name)
                try:
                    if isinstance(times[name], Exception):
                        raise times[name]
                    row["ms"] = times[name]
                    row["gbs"] = kv_bytes / (row["ms"] * 1e-3) / 1e9
                    if copy_gbs:
                        row["pct_copy"] = 100.0 * row["gbs"] / copy_gbs
                    out = fn(sets[0], seqlens_t).float()
                    if name == "sdpa gqa":
                        ref = out
                    row["_out"] = out
                except Exception as exc:
                    row["error"] = common.after_error(exc, on_cuda)
                rows.append(row)
                common.progress(f"B={B:<3} L={common.fmt_len(L):<5} {name:<20} {common.fmt(row.get('ms'), '.4f')} ms "
                                f"{common.fmt(row.get('gbs'), '.0f')} GB/s"
                                + (f" ({common.fmt(row.get('pct_copy'), '.0f')}% of copy)" if copy_gbs else "")
                                + (f"  ({row['error']})" if row["error"] else ""))
            # correctness: every row against SDPA (or fused contiguous if SDPA failed) on set 0
            here = [r for r in rows if r["B"] == B and r["L"] == L]
            ref = ref if ref is not None else next((r["_out"] for r in here if "_out" in r), None)
            for r in here:
                out = r.pop("_out", None)
                if out is not None and ref is not None:
                    r["max_abs_diff"] = (out - ref).abs().max().item()
            del sets
            if on_cuda:
                torch.cuda.empty_cache()

    key = {(r["B"], r["L"], r["provider"]): r for r in rows}
    for r in rows:
        # A step (write + attend) is compared with the SDPA step only.
        step = r["provider"].endswith(" step")
        s = key.get((r["B"], r["L"], "sdpa gqa"))
        if r.get("ms") and s and s.get("ms") and not step:
            r["vs_sdpa"] = s["ms"] / r["ms"]
        peers = ("sdpa grouped step",) if step else ("sdpa gqa", "sdpa grouped")
        best = [x["ms"] for n in peers if (x := key.get((r["B"], r["L"], n))) and x.get("ms")]
        if r.get("ms") and best:
            r["vs_best_sdpa"] = min(best) / r["ms"]

    cols = [common.Column("B"), common.Column("L"), common.Column("provider", align_right=False),
            common.Column("ms", "median ms", ".4f"), common.Column("gbs", "K/V GB/s", ".4g"),
            common.Column("pct_copy", "% of copy BW", ".1f"), common.Column("vs_sdpa", "vs sdpa gqa", ".2f"),
            common.Column("vs_best_sdpa", "vs best sdpa", ".2f"), common.Column("max_abs_diff", "max|diff|", ".2e"),
            common.Column("error", align_right=False)]
    body = [f"Hq={Hq}, Hkv={Hkv}, D={D}, {common.dtype_name(dtype)}, Lq=1, full caches, page {PAGE}. "
            f"Device copy bandwidth (read + write): {common.fmt(copy_gbs, '.0f')} GB/s. "
            "K/V GB/s = 2*B*L*Hkv*D*elem / time. vs sdpa: SDPA time / row time (>1: faster). "
            "vs best sdpa: the faster SDPA row's time / row time; for the step rows, sdpa grouped step's. "
            "max|diff|: output vs sdpa gqa.", ""]
    body += common.markdown_table(rows, cols)

    long_L = 32768 if on_cuda else max(seqlens)
    body += ["", f"Goals (caches >= {common.fmt_len(long_L)}; the worst row counts):"]
    goal_rows = ("fused_attn contig", "fused_attn unchecked", "fused_attn paged", "fused_attn op only",
                 "fused_attn cuda")
    for name in goal_rows:
        if name not in provs:
            continue
        mine = [r for r in rows if r["provider"] == name and r["L"] >= long_L]
        fr = [r["pct_copy"] / 100 for r in mine if r.get("pct_copy") is not None]
        vs = [r["vs_sdpa"] for r in mine if r.get("vs_sdpa") is not None]
        body.append(common.goal_line(f"{name}: fraction of copy bandwidth", min(fr) if fr else None, 0.6,
                                     higher_is_better=True))
        body.append(common.goal_line(f"{name}: speed-up vs sdpa gqa", min(vs) if vs else None, 2.0,
                                     higher_is_better=True))
    if not on_cuda:
        body.append("- (CPU: informational; the goals are for the GPU)")

    for r in rows:
        r["copy_gbs"] = copy_gbs
    keys = ["provider", "B", "L", "Hq", "Hkv", "D", "dtype", "kv_bytes", "ms", "gbs", "pct_copy", "copy_gbs",
            "vs_sdpa", "vs_best_sdpa", "max_abs_diff", "error"]
    common.finish(args, on_cuda, suite, flav, header, body, rows, keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
