"""Peak memory of attention forward and forward+backward vs sequence length, and the longest L that fits.

    python -m benchmarks.bench_memory            # CUDA: B=1, H=16, D=128, bf16, L = 1k..64k, then doubling
                                                 # to --max-seqlen (128k) to find each provider's limit
    python -m benchmarks.bench --suite memory    # the same through the main entry point

Providers (as in benchmarks/bench.py): fused_attn, and torch SDPA pinned to flash, efficient, cuDNN and
math on CUDA; fused_attn, sdpa (torch's CPU flash kernel) and sdpa_math on CPU.

What is measured, per provider and L (each provider runs in its own subprocess, so an out-of-memory
or a kernel fault ends only that provider's sweep):
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was allocated
  before the call: the inputs q, k, v and dout are excluded; the output, saved tensors, workspaces
  and the gradients dq, dk, dv are included. One warm-up call at a small L first (compiles kernels,
  creates the cuBLAS/cuDNN handles). "fwd" is one call under torch.no_grad(); "fwd+bwd" one
  forward and one backward with a random output gradient.
- CPU: one fresh subprocess per (provider, L), in which every allocation of 64 KiB or more is its
  own mapping (MALLOC_MMAP_THRESHOLD_), so that freed memory is not silently reused; the peak
  resident set during the call (VmHWM, reset through /proc/self/clear_refs just before it) minus
  the resident set then (inputs, a tiny warm-up). Coarser than CUDA's allocator statistics (page
  granularity, small allocations from the heap), but comparable between providers.
An out-of-memory error ends a provider's sweep (larger L would fail too); other errors print n/a.
"Projected max L" extrapolates the last two measured points (memory ~ L^p) to the device memory:
an estimate for providers that never ran out within the sweep, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from benchmarks import common
from benchmarks.bench import make_provider

REPO = Path(__file__).resolve().parent.parent
SUITE = "memory"


def plan(flav: str, on_cuda: bool, max_seqlen: Optional[int]):
    """(providers, heads, head_dim, dtype, sweep seqlens, extension seqlens)."""
    if on_cuda:
        providers = ["fused_attn", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"]
        H, D, dtype = 16, 128, torch.bfloat16
        sweep = [1024, 4096] if flav == "quick" else [1024 << i for i in range(7)]  # 1k..64k
        limit = max_seqlen if max_seqlen is not None else (sweep[-1] if flav == "quick" else 131072)
    else:
        providers = ["fused_attn", "sdpa", "sdpa_math"]
        H, D, dtype = 4, 64, torch.float32
        sweep = {"quick": [256, 512], "small": [512, 1024, 2048, 4096], "full": [1024, 2048, 4096, 8192]}[flav]
        limit = max_seqlen if max_seqlen is not None else sweep[-1]
    ext = []
    L = sweep[-1] * 2
    while L <= limit:
        ext.append(L)
        L *= 2
    return providers, H, D, dtype, sweep, ext


# ----------------------------------------------------------------------------------------------
# Child: measure one provider (CUDA: a list of L; CPU: one L per process)


def _inputs(H, L, D, dtype, device):
    q, k, v = (common.rand((1, H, L, D), device, dtype, requires_grad=True) for _ in range(3))
    dout = common.rand((1, H, L, D), device, dtype)
    return q, k, v, dout


def _run(prov, q, k, v, dout, backward: bool) -> None:
    with prov.context():
        if backward:
            prov.fn(q, k, v, False).backward(dout)
        else:
            with torch.no_grad():
                prov.fn(q, k, v, False)


def _status_bytes(field: str) -> int:
    """A memory figure of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _cpu_peak_start() -> int:
    """Resets the process's peak resident set (VmHWM) to what it holds now, and returns that: the
    base of the next _cpu_peak_above. (The lifetime peak, ru_maxrss, was often set before the call
    by the inputs' temporaries, so the call's own peak did not show.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _cpu_peak_above(base: int) -> int:
    return _status_bytes("VmHWM") - base


def child(args) -> int:
    device = args.device
    on_cuda = device == "cuda"
    prov = make_provider(args.child)
    dtype = getattr(torch, args.dtype)
    H, D = args.heads, args.head_dim
    seqlens = [int(s) for s in args.seqlens.split(",")]

    def emit(**kw):
        print("RESULT " + json.dumps(kw), flush=True)

    # Warm-up at a small L: kernels compiled, library handles and workspaces created.
    try:
        w = _inputs(H, min(seqlens[0], 1024 if on_cuda else 64), D, dtype, device)
        _run(prov, *w, backward=True)
        del w
    except Exception as exc:
        err = common.after_error(exc, on_cuda)
        for L in seqlens:
            emit(provider=args.child, L=L, error=f"warm-up failed: {err}")
        return 0
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    for i, L in enumerate(seqlens):
        if common.out_of_time():
            break
        row = {"provider": args.child, "L": L}
        try:
            q, k, v, dout = _inputs(H, L, D, dtype, device)
            if on_cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                _run(prov, q, k, v, dout, backward=False)
                torch.cuda.synchronize()
                row["fwd_bytes"] = torch.cuda.max_memory_allocated() - base
                torch.cuda.reset_peak_memory_stats()
                _run(prov, q, k, v, dout, backward=True)
                torch.cuda.synchronize()
                row["fwdbwd_bytes"] = torch.cuda.max_memory_allocated() - base
            else:
                base = _cpu_peak_start()
                _run(prov, q, k, v, dout, backward=False)
                row["fwd_bytes"] = _cpu_peak_above(base)
                base = _cpu_peak_start()
                _run(prov, q, k, v, dout, backward=True)
                row["fwdbwd_bytes"] = _cpu_peak_above(base)
        except Exception as exc:
            row["error"] = common.after_error(exc, on_cuda)
        q = k = v = dout = None
        emit(**row)
        if row.get("error") == "OOM":
            for L2 in seqlens[i + 1:]:
                emit(provider=args.child, L=L2, error="not run (OOM at a smaller L)")
            break
        if on_cuda:
            torch.cuda.empty_cache()
    return 0


# ----------------------------------------------------------------------------------------------
# Parent


def _report(r: dict) -> None:
    common.progress(f"{r['provider']:<16} L={r['L']:<7} fwd {common.fmt(_mib(r.get('fwd_bytes')), '.1f')} MiB  "
                    f"fwd+bwd {common.fmt(_mib(r.get('fwdbwd_bytes')), '.1f')} MiB"
                    + (f"  ({r['error']})" if r.get("error") else ""))


def _spawn(args, device, name, seqlens, H, D, dtype, timeout_s) -> list[dict]:
    """Run one child; report each row as it arrives (a CUDA sweep can take minutes)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", name, "--device", device,
           "--seqlens", ",".join(map(str, seqlens)), "--heads", str(H), "--head-dim", str(D),
           "--dtype", common.dtype_name(dtype)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if device == "cpu":
        # Every allocation of 64 KiB or more its own mapping, returned when freed: glibc's malloc
        # otherwise serves a call's tensors from memory freed earlier, already resident, and the
        # resident set does not grow with them.
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    rows: list[dict] = []
    timed_out = threading.Event()
    with tempfile.TemporaryFile(mode="w+") as err_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)

        def kill():
            timed_out.set()
            proc.kill()  # only this child, which this function started

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    row = json.loads(line[len("RESULT "):])
                    rows.append(row)
                    _report(row)
            proc.wait()
        finally:
            timer.cancel()
        err_file.seek(0)
        err = err_file.read()
    done = {r["L"] for r in rows}
    missing = [L for L in seqlens if L not in done]
    if missing and proc.returncode == 0 and not timed_out.is_set() and common.out_of_time():
        return rows  # the child stopped at the time budget: rows skipped, not failed
    if missing:
        tail = [s for s in err.strip().splitlines() if s.strip()]
        why = (f"timed out after {timeout_s}s" if timed_out.is_set() else
               f"subprocess ended (rc {proc.returncode}): {tail[-1][:120] if tail else 'no message'}")
        for L in missing:
            rows.append({"provider": name, "L": L, "error": why})
            _report(rows[-1])
    return rows


def _mib(b) -> Optional[float]:
    return None if b is None else b / 2**20


def _capacity_bytes(on_cuda: bool) -> Optional[int]:
    try:
        if on_cuda:
            return torch.cuda.mem_get_info()[1]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except Exception:
        return None
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--max-seqlen", type=int, help="keep doubling L past the sweep up to this (CUDA default 131072)")
    p.add_argument("--providers", help="comma-separated provider names (see benchmarks/bench.py)")
    p.add_argument("--timeout-s", type=int, default=None, help="per-subprocess time limit")
    # child mode (internal)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seqlens", help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--head-dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    device, on_cuda = common.resolve_device(args)
    flav = common.flavour(args, on_cuda)
    providers, H, D, dtype, sweep, ext = plan(flav, on_cuda, args.max_seqlen)
    if args.providers:
        providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    timeout_s = args.timeout_s or (300 if on_cuda else 240)
    elem = torch.empty((), dtype=dtype).element_size()
    header = common.header_lines("fused_attn benchmark: peak memory", on_cuda, flav)
    print("\n".join(header), flush=True)
    print(f"B=1, H={H}, D={D}, {common.dtype_name(dtype)}, non-causal; L = "
          f"{', '.join(map(common.fmt_len, sweep + ext))}", flush=True)

    seqlens = sweep + ext
    rows: list[dict] = []
    for name in providers:
        if common.out_of_time():
            break
        if on_cuda:
            got = _spawn(args, device, name, seqlens, H, D, dtype, timeout_s)
        else:
            got = []
            for L in seqlens:  # one process per L: each measured with a fresh allocator
                r = _spawn(args, device, name, [L], H, D, dtype, timeout_s)
                got += r
                if any(x.get("error") == "OOM" or "timed out" in x.get("error", "") for x in r):
                    for L2 in seqlens:
                        if L2 > L:
                            got.append({"provider": name, "L": L2, "error": "not run (failed at a smaller L)"})
                            _report(got[-1])
                    break
        for r in got:
            r["input_bytes"] = 4 * H * r["L"] * D * elem
        rows += got

    baseline = "sdpa_flash" if on_cuda else "sdpa"
    base = {r["L"]: r.get("fwdbwd_bytes") for r in rows if r["provider"] == baseline}
    for r in rows:
        r.setdefault("error", "")
        r["fwd_mib"] = _mib(r.get("fwd_bytes"))
        r["fwdbwd_mib"] = _mib(r.get("fwdbwd_bytes"))
        b = base.get(r["L"])
        r["vs_baseline"] = (r["fwdbwd_bytes"] / b) if r.get("fwdbwd_bytes") is not None and b else None
        r["bytes_per_token"] = (r["fwdbwd_bytes"] / r["L"]) if r.get("fwdbwd_bytes") is not None else None

    # Longest L per provider, and a memory-only extrapolation of the limit.
    capacity = _capacity_bytes(on_cuda)
    limits = []
    for name in providers:
        mine = sorted((r for r in rows if r["provider"] == name), key=lambda r: r["L"])
        ok = [r for r in mine if r.get("fwdbwd_bytes") is not None]
        failed = next((r for r in mine if r.get("error") and r["L"] > (ok[-1]["L"] if ok else 0)), None)
        lim = {"provider": name, "longest_ok": ok[-1]["L"] if ok else None,
               "first_failure": f"{common.fmt_len(failed['L'])}: {failed['error']}" if failed else
               f"none up to {common.fmt_len(seqlens[-1])}"}
        if len(ok) >= 2 and capacity:
            (a, b) = ok[-2], ok[-1]
            ua, ub = a["fwdbwd_bytes"] + a["input_bytes"], b["fwdbwd_bytes"] + b["input_bytes"]
            if ua > 0 and ub > ua:
                expo = max(1.0, math.log(ub / ua) / math.log(b["L"] / a["L"]))
                lim["growth_exponent"] = expo
                lim["projected_max_L"] = int(b["L"] * (capacity * 0.95 / ub) ** (1 / expo))
        limits.append(lim)

    cols = [common.Column("provider", align_right=False), common.Column("L"),
            common.Column("fwd_mib", "fwd peak MiB", ".1f"), common.Column("fwdbwd_mib", "fwd+bwd peak MiB", ".1f"),
            common.Column("bytes_per_token", "fwd+bwd bytes/token", ".0f"),
            common.Column("vs_baseline", f"fwd+bwd vs {baseline}", ".2f"), common.Column("error", align_right=False)]
    body = [f"Peak memory above the inputs (q, k, v, dout: 4*H*L*D*{elem} bytes), B=1, H={H}, D={D}, "
            f"{common.dtype_name(dtype)}, non-causal. {'CUDA allocator peak' if on_cuda else 'CPU peak RSS'}"
            f" (see the module docstring). vs {baseline}: this row's fwd+bwd peak / {baseline}'s.", ""]
    body += common.markdown_table(sorted(rows, key=lambda r: (providers.index(r["provider"]) if r["provider"] in providers
                                                              else 99, r["L"])), cols)
    body += ["", "Longest L that ran forward+backward (the sweep stops at the first out-of-memory):", ""]
    body += common.markdown_table(limits, [
        common.Column("provider", align_right=False), common.Column("longest_ok", "longest L run"),
        common.Column("first_failure", "first failure", align_right=False),
        common.Column("growth_exponent", "memory ~ L^p, p", ".2f"),
        common.Column("projected_max_L", "projected max L (memory only, extrapolated)")])
    if capacity:
        body.append(f"\nDevice memory used for the projection: {capacity / 2**30:.1f} GiB (95% of it).")

    body += ["", "Goals:"]
    target_L = 16384 if on_cuda else max((L for L in sweep if base.get(L)), default=None)
    fa = next((r for r in rows if r["provider"] == "fused_attn" and r["L"] == target_L), None)
    body.append(common.goal_line(
        f"fused_attn fwd+bwd peak / {baseline} at L={common.fmt_len(target_L) if target_L else '?'}"
        + ("" if on_cuda else " (CPU, informational)"), fa.get("vs_baseline") if fa else None, 1.1,
        higher_is_better=False))

    keys = ["provider", "L", "fwd_bytes", "fwdbwd_bytes", "input_bytes", "vs_baseline", "error"]
    for r in rows:
        r.update(H=H, D=D, dtype=common.dtype_name(dtype))
    common.finish(args, on_cuda, SUITE, flav, header, body, rows, keys + ["H", "D", "dtype"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
