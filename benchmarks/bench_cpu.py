"""CPU benchmark: the `cpu` backend against torch SDPA's CPU kernels, and its peak memory.

Run from the repository root (``make bench`` on a machine without a GPU runs this)::

    python -m benchmarks.bench_cpu            # full sweep, 3 to 10 minutes on 2 cores
    python -m benchmarks.bench_cpu --quick    # a few rows, to check that everything runs

Speed: fused_attn (backend="cpu") vs torch SDPA with its default CPU choice (the flash kernel)
and pinned to SDPBackend.MATH (which materialises the L x L scores), B=1, H=4, D=64, fp32 and
bf16, full and causal, forward (under no_grad) and forward+backward, L from 512 to 8192.

Memory: peak resident set size (resource.getrusage maxrss) of a fresh subprocess that runs one
forward at B=1, H=2, D=64, fp32, for several L; it must grow linearly with L (the goal at
L=32768 is under 1.5 GB; the inputs and output alone are 64 MiB).

Providers are timed interleaved (one call of each in turn, median per provider), so a busy
spell on a shared machine slows all of them alike (common.time_ms_each). Goals are reported, never
asserted: cpu >= 0.8x the flash kernel (aim: > 1x) and >= 3x math
at L >= 2048. Timings need an otherwise idle machine: the load average is recorded.
Results go to benchmarks/results/<cpu>/bench_cpu{,-quick}.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from . import common, plots
from .bench import (RESULTS_DIR, Config, device_slug, environment_lines, make_inputs, make_provider,
                    make_step)

PROVIDERS = ("fused_attn:cpu", "sdpa", "sdpa_math")
LABELS = {"fused_attn:cpu": "cpu", "sdpa": "flash", "sdpa_math": "math"}
PASSES = ("fwd", "fwd+bwd")
MEMORY_SEQLENS = (8192, 16384, 32768)
MEMORY_GOAL_BYTES = 1.5e9


def configs(quick: bool) -> list[Config]:
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    seqlens = (512, 2048) if quick else (512, 1024, 2048, 4096, 8192)
    return [Config(dtype, causal, 1, 4, L, 64) for dtype in dtypes for causal in (False, True) for L in seqlens]


def in_context(step, context):
    """step() run inside context() (a provider's pinned SDPA backend)."""
    def run():
        with context():
            step()
    return run


def time_rows(cfgs: list[Config], target_s: float) -> dict:
    """{(cfg, pass, provider): median ms or None}, printing progress to stderr."""
    providers = [make_provider(name) for name in PROVIDERS]
    times = {}
    start = time.perf_counter()
    for cfg in cfgs:
        if common.out_of_time():
            break
        for pass_ in PASSES:
            sets = make_inputs(cfg, "cpu", grad=pass_ == "fwd+bwd", n_sets=2)
            steps = {p.name: in_context(make_step(p, cfg, sets, pass_), p.context) for p in providers}
            grads = [t for s in sets for t in s[:3] if t.requires_grad]
            # A step whose warm-up takes over 3 s is timed once (keeps the default run near 10 minutes).
            result = common.time_ms_each(steps, False, grads=grads, cpu_target_s=target_s, cpu_max_reps=15,
                                         single_call_s=3.0)
            for name, value in result.items():
                if isinstance(value, Exception):  # e.g. out of memory in the math kernel
                    print(f"  {name}: {type(value).__name__}: {value}", file=sys.stderr)
                    result[name] = None
            for name in PROVIDERS:
                times[cfg, pass_, name] = result.get(name)
            print(f"  [{time.perf_counter() - start:6.1f}s] {cfg.dtype_name:<8} causal={cfg.causal!s:<5} "
                  f"L={cfg.L:<5} {pass_:<7} " + "  ".join(f"{LABELS[n]} {fmt_ms(result.get(n))}" for n in PROVIDERS),
                  file=sys.stderr, flush=True)
            del sets, steps
    return times


# The child reports VmHWM, its own peak RSS: getrusage's ru_maxrss survives exec on Linux, so a
# child forked from a big benchmark process would report the parent's peak instead.
PEAK_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, fused_attn

    def peak_rss():
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    L = int(sys.argv[1])
    q, k, v = (torch.randn(1, 2, L, 64) for _ in range(3))
    before = peak_rss()
    with torch.no_grad():
        out = fused_attn.attention(q, k, v, backend="cpu")
    print(before, peak_rss())
""")
# (The child uses torch's default thread count: memory does not depend on it beyond per-thread
# scratch of a few 64 x 64 tiles.)


def peak_rss(seqlen: int) -> tuple[int, int]:
    """(peak RSS in bytes with the inputs allocated, after the call) of a fresh process running one forward."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(seqlen)], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    before, after = result.stdout.split()
    return int(before), int(after)


def ratio(num, den) -> str:
    return "n/a" if num is None or den is None else f"{num / den:.2f}"


def fmt_ms(ms) -> str:
    return "n/a" if ms is None else f"{ms:.2f}"


def report(cfgs, times, memory, header) -> tuple[list[str], list[list]]:
    """(markdown lines, csv rows)."""
    lines = header + [
        "",
        "Times are medians in ms, B=1, H=4, D=64. `vs flash` / `vs math` = their time / cpu's time (>1: cpu faster).",
        "",
        "| dtype | causal | L | pass | cpu ms | flash ms | math ms | vs flash | vs math | TFLOP/s cpu |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    misses = []
    for cfg in cfgs:
        for pass_ in PASSES:
            cpu, flash, math = (times.get((cfg, pass_, name)) for name in PROVIDERS)
            tflops = "n/a" if cpu is None else f"{cfg.flops(pass_) / (cpu * 1e-3) / 1e12:.3f}"
            lines.append(f"| {cfg.dtype_name} | {cfg.causal} | {cfg.L} | {pass_} | {fmt_ms(cpu)} | {fmt_ms(flash)} | "
                         f"{fmt_ms(math)} | {ratio(flash, cpu)} | {ratio(math, cpu)} | {tflops} |")
            rows.append([cfg.dtype_name, cfg.causal, cfg.B, cfg.H, cfg.L, cfg.D, pass_, fmt_ms(cpu), fmt_ms(flash),
                         fmt_ms(math), ratio(flash, cpu), ratio(math, cpu)])
            if cfg.L >= 2048 and cpu is not None:
                if flash is not None and flash / cpu < 0.8:
                    misses.append(f"{cfg.dtype_name} causal={cfg.causal} L={cfg.L} {pass_}: {flash / cpu:.2f}x flash")
                if math is not None and math / cpu < 3:
                    misses.append(f"{cfg.dtype_name} causal={cfg.causal} L={cfg.L} {pass_}: {math / cpu:.2f}x math")
    lines += ["", "Goals at L >= 2048 (>= 0.8x flash, >= 3x math): "
              + ("all met." if not misses else "missed by " + "; ".join(misses))]
    if memory:
        lines += ["", "Peak RSS (VmHWM) of a fresh process running one fp32 forward, B=1, H=2, D=64 (inputs + "
                  "output: 4 x 2 x L x 64 x 4 bytes):", "", "| L | peak RSS with inputs allocated | peak RSS after "
                  "the forward | goal |", "|---:|---:|---:|---|"]
        for seqlen, (before, after) in memory.items():
            goal = f"< {MEMORY_GOAL_BYTES / 1e9:.1f} GB: {'met' if after < MEMORY_GOAL_BYTES else 'MISSED'}" \
                if seqlen == 32768 else ""
            lines.append(f"| {seqlen} | {before / 2**20:.0f} MiB | {after / 2**20:.0f} MiB | {goal} |")
    return lines, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rows and no memory sweep")
    parser.add_argument("--target-s", type=float, default=0.3, help="seconds of timed calls per row")
    parser.add_argument("--threads", type=int, help="torch threads for every provider (default: torch's choice); "
                        "1 gives steadier ratios when other work shares the machine")
    parser.add_argument("--out-dir", type=Path, help="default: benchmarks/results/<cpu>/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cpu" not in __import__("fused_attn").available_backends():
        raise SystemExit("the fused_attn cpu backend is unavailable: build the extension (make env)")

    cfgs = configs(args.quick)
    header = ["# fused_attn CPU benchmark: cpu backend vs torch SDPA", ""] + environment_lines(on_cuda=False)
    print("\n".join(header), flush=True)
    start = time.perf_counter()
    memory = {} if args.quick else {L: peak_rss(L) for L in MEMORY_SEQLENS}
    times = time_rows(cfgs, args.target_s)
    lines, rows = report(cfgs, times, memory, header)
    lines.append(f"\nTotal run time {time.perf_counter() - start:.0f} s; load average after the run: "
                 f"{os.getloadavg()[0]:.2f}.")
    print("\n".join(lines[len(header):]), flush=True)

    out_dir = args.out_dir or RESULTS_DIR / device_slug(on_cuda=False)
    stem = ("bench_cpu-quick" if args.quick else "bench_cpu") + (f"-{args.threads}thread" if args.threads else "")
    if not times:  # (an earlier run's results are not replaced by an empty table)
        print(f"\nno row was measured (time budget spent): {out_dir / stem}.csv not written", flush=True)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = common.env_columns(on_cuda=False)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dtype", "causal", "B", "H", "L", "D", "pass", "cpu_ms", "flash_ms", "math_ms",
                         "vs_flash", "vs_math", *environment])
        writer.writerows(row + list(environment.values()) for row in rows)
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out_dir / stem}.csv and .md", flush=True)
    for note in plots.render(out_dir / f"{stem}.csv"):
        print(note, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
