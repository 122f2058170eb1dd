"""Helpers shared by the benchmark suites (memory, masked, decode, varlen).

- device choice and the size flavour of a run (quick / small / full);
- timing: on CUDA `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between calls, median);
  on CPU the median of `time.perf_counter` over several calls after warm-up;
- per-row error capture (out of memory, unsupported) so one failing row prints n/a, never aborts;
- result files: CSV and markdown in benchmarks/results/<device-slug>/, with the device name and the
  torch / triton / CUDA versions in both; PNG plots drawn from the CSV (benchmarks/plots.py) if
  matplotlib can be imported.

Everything here must also run on a CPU-only machine, and on the GPU machine with what is installed
(no package index there: no new dependencies).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from benchmarks import plots
from benchmarks.bench import RESULTS_DIR, device_name, device_slug, environment_lines

try:
    import triton
    import triton.testing
except Exception:  # triton is optional on CPU
    triton = None

FLAVOURS = ("quick", "small", "full")


# ----------------------------------------------------------------------------------------------
# Arguments, device, flavour


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes: check that every row runs")
    p.add_argument("--full", action="store_true",
                   help="CPU: the larger sizes (the default on CPU is a short 'small' flavour); no effect on CUDA")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    p.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results/<device>/)")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots even if matplotlib is there")


def resolve_device(args) -> tuple[str, bool]:
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if on_cuda and triton is None:
        raise SystemExit("CUDA timing uses triton.testing.do_bench, but triton cannot be imported")
    return ("cuda" if on_cuda else "cpu"), on_cuda


def flavour(args, on_cuda: bool) -> str:
    """quick: a few tiny rows. full: the issue's sizes (CUDA default). small: CPU default (short)."""
    if args.quick:
        return "quick"
    if on_cuda or args.full:
        return "full"
    return "small"


# ----------------------------------------------------------------------------------------------
# Progress and formatting

_T0 = time.perf_counter()


# An absolute time.time() after which a suite starts no new row (suites.py, --budget-s).
DEADLINE_VARIABLE = "FUSED_ATTN_BENCH_DEADLINE"


def out_of_time() -> bool:
    """Whether this suite's share of the run's time budget is spent: it then starts no new row,
    says so, and writes the rows it has."""
    global _said_out_of_time
    deadline = os.environ.get(DEADLINE_VARIABLE)
    if deadline is None or time.time() <= float(deadline):
        return False
    if not _said_out_of_time:
        progress("time budget spent: the remaining rows are skipped")
        _said_out_of_time = True
    return True


_said_out_of_time = False


def progress(text: str) -> None:
    print(f"  [{time.perf_counter() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)


def fmt(x, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, str):
        return x
    return format(x, spec)


def fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# The short names a suite's --dtype option takes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Errors


def is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    if oom_types and isinstance(exc, oom_types):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or isinstance(exc, MemoryError))


def short_error(exc: BaseException) -> str:
    if is_oom(exc):
        return "OOM"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def after_error(exc: BaseException, on_cuda: bool) -> str:
    """Describe a failed row and release what it left behind (cached blocks after an OOM)."""
    if os.environ.get("BENCH_DEBUG"):
        traceback.print_exc()
    if on_cuda:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        torch.cuda.empty_cache()
    return short_error(exc)


# ----------------------------------------------------------------------------------------------
# Timing


def time_ms(step: Callable[[], object], on_cuda: bool, *, grads: Sequence[torch.Tensor] = (),
            warmup_ms: int = 25, rep_ms: int = 100, cpu_target_s: float = 0.3,
            cpu_min_reps: int = 3, cpu_max_reps: int = 25) -> float:
    """Median milliseconds of one call of step(); grads are set to None before every call.

    step must rotate its inputs itself (several random input sets), never use zeros.
    """
    if on_cuda:
        for t in grads:
            t.grad = None
        step()  # compile / autotune / pick kernels outside the measurement
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None,
                                             return_mode="median"))
    result = _cpu_medians({"step": step}, grads, cpu_target_s, cpu_min_reps, cpu_max_reps)["step"]
    if isinstance(result, Exception):
        raise result
    return result


def time_ms_each(steps: dict[str, Callable[[], object]], on_cuda: bool, *, grads: Sequence[torch.Tensor] = (),
                 cpu_target_s: float = 0.6, cpu_min_reps: int = 3, cpu_max_reps: int = 25,
                 single_call_s: float = math.inf) -> dict[str, object]:
    """{name: median ms, or the exception it raised} of several providers' steps, as time_ms.

    On the CPU the steps are timed interleaved, one call of each in turn, so a busy spell on a
    shared machine slows every provider alike instead of whichever happened to be running; a
    step whose warm-up took over single_call_s is timed by one call only.
    """
    if not on_cuda:
        return _cpu_medians(steps, grads, cpu_target_s, cpu_min_reps, cpu_max_reps, single_call_s)
    results = {}
    for name, step in steps.items():
        try:
            results[name] = time_ms(step, on_cuda, grads=grads)
        except Exception as exc:  # reported in the provider's row; the others still run
            results[name] = exc
    return results


def _cpu_medians(steps, grads, target_s: float, min_reps: int, max_reps: int,
                 single_call_s: float = math.inf) -> dict[str, object]:
    """{name: median ms or exception}: two warm-up calls each (the second one's time sizes the run),
    then rounds of one call of each step, each round in an order of its own, drawn at random (the
    call after a slow or allocating one, or the first after a pause, runs slower: no step should
    mostly be that one; rotating a fixed order left the cyclic successor of the slowest step after
    it in all rounds but one, ~1.5x slower in the decode suite's rows); a step that raises is left
    out of later rounds. The orders are seeded, so runs are repeatable."""
    def call(step):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    results, estimate = {}, {}
    for name, step in steps.items():
        try:
            call(step)
            estimate[name] = call(step)
        except Exception as exc:
            results[name] = exc
    reps = max(min_reps, min(max_reps, int(target_s / max(sum(estimate.values()), 1e-6))))
    samples = {name: [] for name in estimate}
    names = list(samples)
    orders = random.Random(0)
    for rep in range(reps):
        for name in orders.sample(names, len(names)):
            if name in results or (rep > 0 and estimate[name] > single_call_s):
                continue
            try:
                samples[name].append(call(steps[name]))
            except Exception as exc:
                results[name] = exc
    results.update({name: statistics.median(times) * 1e3 for name, times in samples.items() if name not in results})
    return {name: results[name] for name in steps}


def copy_bandwidth_gbs(device: str, on_cuda: bool, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth, (bytes read + bytes written) / median time, in GB/s."""
    nbytes = nbytes or ((1 << 30) if on_cuda else (1 << 27))
    n = nbytes // 2
    src = [torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16) for _ in range(2)]
    dst = torch.empty_like(src[0])
    it = iter(range(1 << 62))

    def step():
        dst.copy_(src[next(it) % 2])

    ms = time_ms(step, on_cuda, warmup_ms=50, rep_ms=300, cpu_target_s=0.5)
    src.clear()  # free the buffers before the next suite allocates
    if on_cuda:
        torch.cuda.empty_cache()
    return 2 * n * 2 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# Environment and results


def env_columns(on_cuda: bool) -> dict[str, str]:
    return {
        "device": device_name(on_cuda),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", "") if triton is not None else "",
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if on_cuda else "",
        "python": platform.python_version(),
    }


def header_lines(title: str, on_cuda: bool, flav: str) -> list[str]:
    lines = [f"# {title}", ""] + environment_lines(on_cuda)
    lines.append(f"- flavour: {flav}" + {"quick": " (tiny sizes, only checks that rows run)",
                                        "small": " (CPU default: reduced sizes; --full for the larger CPU sizes)",
                                        "full": ""}[flav])
    return lines


def results_path(args, on_cuda: bool, suite: str, flav: str, ext: str = ".csv") -> Path:
    folder = args.out_dir or (RESULTS_DIR / device_slug(on_cuda))
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if flav == "full" else f"-{flav}"
    return folder / f"{suite}{suffix}{ext}"


class Column:
    def __init__(self, key: str, header: Optional[str] = None, spec: str = ".3f", align_right: bool = True):
        self.key, self.header, self.spec, self.align_right = key, header or key, spec, align_right


def markdown_table(rows: Iterable[dict], columns: Sequence[Column]) -> list[str]:
    out = ["| " + " | ".join(c.header.replace("|", "\\|") for c in columns) + " |",
           "|" + "|".join("---:" if c.align_right else "---" for c in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c.key)
            cells.append(fmt(v, c.spec) if isinstance(v, float) or v is None else str(v))
        out.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    return out


def write_csv(path: Path, rows: Sequence[dict], keys: Sequence[str], on_cuda: bool) -> None:
    env = env_columns(on_cuda)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(keys) + list(env))
        for r in rows:
            vals = []
            for k in keys:
                v = r.get(k)
                vals.append("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
            w.writerow(vals + list(env.values()))


def finish(args, on_cuda: bool, suite: str, flav: str, header: list[str], body: list[str],
           rows: Sequence[dict], csv_keys: Sequence[str]) -> Optional[Path]:
    """Print the report, write <suite>.csv and <suite>.md; return the CSV path (None, and nothing
    written, when no row was measured: results of an earlier run are not replaced by an empty table)."""
    print("\n".join([""] + body), flush=True)
    path = results_path(args, on_cuda, suite, flav)
    if not rows:
        print(f"\nno row was measured (time budget spent): {path} not written", flush=True)
        return None
    write_csv(path, rows, csv_keys, on_cuda)
    md = path.with_suffix(".md")
    md.write_text("\n".join(header + [""] + body) + "\n")
    print(f"\nwrote {path} and {md}", flush=True)
    if not getattr(args, "no_plot", False):
        for note in plots.render(path):
            print(note, flush=True)
    return path


def goal_line(name: str, value: Optional[float], target: float, *, higher_is_better: bool, spec: str = ".2f") -> str:
    if value is None:
        return f"- {name}: n/a (target {'>=' if higher_is_better else '<='} {target:{spec}})"
    ok = value >= target if higher_is_better else value <= target
    return f"- {name}: {value:{spec}} (target {'>=' if higher_is_better else '<='} {target:{spec}}) " \
           f"**{'met' if ok else 'MISSED'}**"


def rand(shape, device, dtype, requires_grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Random normal tensor (never zeros or constants)."""
    t = torch.randn(shape, device=device, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def paged_copy(k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contiguous caches (B, capacity, Hkv, D) scattered over shuffled pages: (k_pages, v_pages,
    block_table (B, pages per sequence) int32), the capacity padded to whole pages."""
    B, capacity = k_cache.shape[:2]
    pages = -(-capacity // page_size)
    order = torch.randperm(B * pages, generator=generator).to(k_cache.device)

    def scatter(cache):
        padded = torch.nn.functional.pad(cache, (0, 0, 0, 0, 0, pages * page_size - capacity))
        out = torch.empty((B * pages, page_size) + tuple(cache.shape[2:]), device=cache.device, dtype=cache.dtype)
        out[order] = padded.reshape(out.shape)
        return out

    return scatter(k_cache), scatter(v_cache), order.view(B, pages).to(torch.int32)
