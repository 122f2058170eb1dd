"""Benchmark fused_attn.attention against torch.nn.functional.scaled_dot_product_attention.

Run from the repository root (``make bench`` does this)::

    python -m benchmarks.bench            # full sweep for this machine (GPU if there is one)
    python -m benchmarks.bench --quick    # a few rows, to check that everything runs
    python -m benchmarks.bench --providers fused_attn,fused_attn:reference,sdpa_math

On a machine without a GPU, a run without --providers/--seqlens/--out is the dedicated CPU suite,
benchmarks/bench_cpu.py (the cpu backend vs SDPA's flash and math kernels, plus peak memory);
give --providers (e.g. the default fused_attn,sdpa,sdpa_math) for this module's generic sweep.

Providers:
    fused_attn            fused_attn.attention(..., backend=None): automatic dispatch
    fused_attn:NAME       fused_attn.attention(..., backend="NAME"), e.g. fused_attn:triton
    sdpa                  torch SDPA, torch's own backend choice (on CPU: its CPU flash kernel)
    sdpa_flash            torch SDPA pinned to SDPBackend.FLASH_ATTENTION (CUDA)
    sdpa_efficient        torch SDPA pinned to SDPBackend.EFFICIENT_ATTENTION (CUDA)
    sdpa_cudnn            torch SDPA pinned to SDPBackend.CUDNN_ATTENTION (CUDA)
    sdpa_math             torch SDPA pinned to SDPBackend.MATH (materialises L x L scores)
    flash_attn            flash_attn.flash_attn_func (the flash-attn package), where it is installed
    flex                  torch's FlexAttention under torch.compile (causal as a block mask); not
                          a default, as it compiles once per shape (minutes over a whole sweep)

Default providers on CUDA: fused_attn (dispatch: triton), fused_attn:cuda (where the extension
has the CUDA kernels), sdpa_flash, sdpa_cudnn, sdpa_efficient, flash_attn where importable; the
goal lines after the table are the issues' GPU goals, read from those rows.

FLOPs follow the convention every peer benchmark uses (flash-attn, FlagAttention): forward
4*B*H*L*L*D, halved for causal; backward 2.5x forward, so forward+backward is 3.5x forward.
"vs_sdpa" is (time of the SDPA baseline row of the same config and pass) / (time of this row):
above 1 means faster than the baseline (sdpa_flash on CUDA, sdpa on CPU).

Forward rows are timed under torch.no_grad() (inference); forward+backward rows time one forward
and one backward with a random output gradient. Inputs are random normal and the timed function
rotates among several input sets. On CUDA timing uses triton.testing.do_bench (median, with
warm-up, L2 flushed between calls); on CPU the median of time.perf_counter over several calls.

`--suite` (benchmarks/suites.py) also runs the other suites: memory, masked, decode, varlen (files
benchmarks/bench_<suite>.py); `make bench` runs all of them (`--suite speed` for this sweep only).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import itertools
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks import plots

try:
    import fused_attn
except Exception as exc:  # the package is the thing under test: no silent fallback
    raise SystemExit(
        f"benchmarks/bench.py: cannot import fused_attn ({type(exc).__name__}: {exc}).\n"
        "Run from the repository root with the package installed (`make bench`)."
    ) from exc

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = None
    sdpa_kernel = None

try:
    import triton
    import triton.testing
except Exception:  # triton is optional on CPU
    triton = None

RESULTS_DIR = Path(__file__).resolve().parent / "results"
N_INPUT_SETS = 3
PASSES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class Config:
    dtype: torch.dtype
    causal: bool
    B: int
    H: int
    L: int
    D: int

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def flops(self, pass_: str) -> float:
        f = 4.0 * self.B * self.H * self.L * self.L * self.D
        if self.causal:
            f /= 2
        return f * (3.5 if pass_ == "fwd+bwd" else 1.0)


def cuda_configs(quick: bool) -> list[Config]:
    # batch * seqlen = 16k tokens, hidden 2048: head dim 64 -> 32 heads, 128 -> 16 heads.
    seqlens = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    head_dims = (128,) if quick else (64, 128)
    out = []
    for D in head_dims:
        H = 2048 // D
        for L in seqlens:
            for causal in (False, True):
                out.append(Config(torch.bfloat16, causal, 16384 // L, H, L, D))
    return out


def cpu_configs(quick: bool) -> list[Config]:
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    seqlens = (256,) if quick else (256, 512, 1024)
    out = []
    for dtype in dtypes:
        for L in seqlens:
            for causal in (False, True):
                out.append(Config(dtype, causal, 1, 4, L, 64))
    return out


# ----------------------------------------------------------------------------------------------
# Providers


@dataclass
class Provider:
    name: str
    fn: Callable  # fn(q, k, v, causal) -> out
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    is_sdpa: bool = False


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _pinned_sdpa(name: str, backend_attr: str) -> Provider:
    if sdpa_kernel is None:
        raise ValueError(f"{name}: torch.nn.attention.sdpa_kernel needs torch >= 2.3")
    backend = getattr(SDPBackend, backend_attr)
    return Provider(name, _sdpa, lambda: sdpa_kernel(backend), is_sdpa=True)


def _fused(backend: Optional[str]) -> Provider:
    name = "fused_attn" if backend is None else f"fused_attn:{backend}"

    def fn(q, k, v, causal):
        return fused_attn.attention(q, k, v, causal=causal, backend=backend)

    return Provider(name, fn)


def _flash_attn() -> Provider:
    from flash_attn import flash_attn_func  # (B, L, H, D) layout: the same memory, transposed views

    def fn(q, k, v, causal):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

    return Provider("flash_attn", fn)


def _flex() -> Provider:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    block_masks = {}  # one per (L, device): building it is part of setting up, not of each call

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def fn(q, k, v, causal):
        key = (q.shape[-2], q.device)
        if causal and key not in block_masks:
            block_masks[key] = create_block_mask(causal_mask, None, None, key[0], key[0], device=q.device)
        return compiled(q, k, v, block_mask=block_masks[key] if causal else None)

    return Provider("flex", fn)


def make_provider(name: str) -> Provider:
    if name == "flash_attn":
        return _flash_attn()
    if name == "flex":
        return _flex()
    if name == "fused_attn":
        return _fused(None)
    if name.startswith("fused_attn:"):
        return _fused(name.split(":", 1)[1])
    if name == "sdpa":
        return Provider(name, _sdpa, is_sdpa=True)
    pinned = {
        "sdpa_flash": "FLASH_ATTENTION",
        "sdpa_efficient": "EFFICIENT_ATTENTION",
        "sdpa_cudnn": "CUDNN_ATTENTION",
        "sdpa_math": "MATH",
    }
    if name in pinned:
        return _pinned_sdpa(name, pinned[name])
    raise ValueError(f"unknown provider {name!r}")


def default_providers(on_cuda: bool) -> list[str]:
    if not on_cuda:
        return ["fused_attn", "sdpa", "sdpa_math"]
    names = ["fused_attn"]
    if "cuda" in available_fused_backends():
        names.append("fused_attn:cuda")
    names += ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attn")
    return names


# The GPU goals (issues #3 and #7), bf16: (name, provider, against, D, L, passes, target); each
# is the worst ratio time(against) / time(provider) over causal and not and the passes named.
GPU_GOALS = [
    ("forward vs SDPA flash (D=128, L=4096)", "fused_attn", "sdpa_flash", 128, 4096, ("fwd",), 1.2),
    ("forward+backward vs SDPA flash (D=128, L=4096)", "fused_attn", "sdpa_flash", 128, 4096, ("fwd+bwd",), 1.0),
    ("forward vs SDPA flash (D=64, L=4096)", "fused_attn", "sdpa_flash", 64, 4096, ("fwd",), 1.1),
    ("vs SDPA flash at L=512 (D=128)", "fused_attn", "sdpa_flash", 128, 512, PASSES, 0.8),
    ("stretch: forward vs SDPA cuDNN (D=128, L=4096)", "fused_attn", "sdpa_cudnn", 128, 4096, ("fwd",), 0.9),
    ("forward+backward vs SDPA efficient (B=4, H=16, L=4096, D=128)", "fused_attn:cuda",
     "sdpa_efficient", 128, 4096, ("fwd+bwd",), 1.0),
]


def goals_first(configs: list[Config]) -> list[Config]:
    """The configurations in the order a sweep measures them: those the GPU goals read first
    (GPU_GOALS: head dim and length), the rest after, each group in sweep order."""
    goal_shapes = {(D, L) for _, _, _, D, L, _, _ in GPU_GOALS}
    return sorted(configs, key=lambda c: (c.D, c.L) not in goal_shapes)


def goal_lines(rows: list) -> list[str]:
    from benchmarks.common import goal_line  # common imports this module

    ms = {(r.provider, r.cfg.D, r.cfg.L, r.cfg.causal, r.pass_): r.ms for r in rows
          if r.ms and r.cfg.dtype == torch.bfloat16}
    lines = ["", "Goals (bf16; the worst of causal and not counts):"]
    for name, provider, against, D, L, passes, target in GPU_GOALS:
        ratios = [ms[(against, D, L, causal, p)] / ms[(provider, D, L, causal, p)]
                  for causal in (False, True) for p in passes
                  if (provider, D, L, causal, p) in ms and (against, D, L, causal, p) in ms]
        lines.append(goal_line(f"{provider} {name}", min(ratios) if ratios else None, target,
                                      higher_is_better=True))
    return lines


def available_fused_backends() -> list[str]:
    try:
        return list(fused_attn.available_backends())
    except Exception as exc:
        return [f"<available_backends() failed: {type(exc).__name__}: {exc}>"]


# ----------------------------------------------------------------------------------------------
# Inputs and timing


def make_inputs(cfg: Config, device: str, grad: bool, n_sets: int = N_INPUT_SETS):
    """n_sets independent random normal (q, k, v, dout) sets; never zeros or constant data."""
    sets = []
    shape = (cfg.B, cfg.H, cfg.L, cfg.D)
    for _ in range(n_sets):
        q, k, v = (torch.randn(shape, device=device, dtype=cfg.dtype, requires_grad=grad) for _ in range(3))
        dout = torch.randn(shape, device=device, dtype=cfg.dtype) if grad else None
        sets.append((q, k, v, dout))
    return sets


def make_step(provider: Provider, cfg: Config, sets, pass_: str) -> Callable[[], None]:
    """One call of the timed function; each call takes the next input set."""
    cycle = itertools.cycle(sets)
    causal = cfg.causal
    fn = provider.fn
    if pass_ == "fwd":

        def step():
            q, k, v, _ = next(cycle)
            with torch.no_grad():
                fn(q, k, v, causal)

    else:

        def step():
            q, k, v, dout = next(cycle)
            fn(q, k, v, causal).backward(dout)

    return step


def clear_grads(sets) -> None:
    for q, k, v, _ in sets:
        q.grad = k.grad = v.grad = None


def time_cuda(step, sets, warmup_ms: int, rep_ms: int) -> float:
    grads = [t for s in sets for t in s[:3]] if sets[0][0].requires_grad else None
    return float(
        triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads, return_mode="median")
    )


def time_cpu(step, sets, target_s: float, min_reps: int = 3, max_reps: int = 25) -> float:
    grad = sets[0][0].requires_grad
    # warm-up (first call may allocate, pick kernels, compile) and a cost estimate
    for _ in range(2):
        if grad:
            clear_grads(sets)
        t0 = time.perf_counter()
        step()
        est = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(target_s / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        if grad:
            clear_grads(sets)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def max_abs_diff(provider: Provider, cfg: Config, sets, reference: Provider) -> Optional[float]:
    """Forward sanity check of a non-SDPA row against the SDPA baseline on the same input."""
    q, k, v, _ = sets[0]
    with torch.no_grad():
        with provider.context():
            out = provider.fn(q, k, v, cfg.causal)
        with reference.context():
            ref = reference.fn(q, k, v, cfg.causal)
    return (out.float() - ref.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Environment description


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\bcpu @.*$", "", text)  # drop the clock suffix of Intel model names
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first value of a /proc/cpuinfo field (None where there is no such file or field)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                field, _, value = line.partition(":")
                if field.strip().lower() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_generation() -> Optional[str]:
    """"family<N>" from /proc/cpuinfo where the model name has no number in it: virtual machines
    name AMD CPUs "AMD EPYC" from Zen 2 to Zen 5, and the family tells them apart (23: Zen 1-2,
    25: Zen 3-4, 26: Zen 5); None where the name is specific enough."""
    if re.search(r"\d", cpu_name()):
        return None
    family = _cpuinfo_field("cpu family")
    return f"family{family}" if family and family.isdigit() else None


def device_name(on_cuda: bool) -> str:
    return torch.cuda.get_device_name() if on_cuda else cpu_name()


def cpu_kernels_tag() -> str:
    """What sets the cpu backend's speed on this CPU: "amx" or "avx512-bf16" (its bf16 products),
    else the instruction set of its kernels ("avx512", "avx2", "portable")."""
    try:
        from fused_attn.backends import cpu_backend

        products = cpu_backend.bf16_products()
        return cpu_backend.active_isa() if products == "fp32" else products
    except RuntimeError:  # no native extension
        return "no-native"


def torch_cpu_capability() -> str:
    """The instruction set of torch's own CPU kernels (the peers on a CPU): "AVX512", "AVX2", ...
    (ATEN_CPU_CAPABILITY=avx2 caps it, as FUSED_ATTN_CPU_ISA caps ours)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch before 2.1
        return "n/a"


def device_slug(on_cuda: bool) -> str:
    """The results folder's name. A CPU's carries cpu_kernels_tag, and cpu_generation where its name
    is generic: virtual machines report "AMD EPYC" for CPUs several generations apart."""
    slug = slugify(device_name(on_cuda))
    if on_cuda:
        return slug
    if not slug.startswith("cpu"):
        slug = f"cpu-{slug}"
    generation = cpu_generation()
    if generation is not None:
        slug = f"{slug}-{generation}"
    return f"{slug}-{cpu_kernels_tag()}"


def environment_lines(on_cuda: bool) -> list[str]:
    lines = [
        f"- device: {device_name(on_cuda)}"
        + ("" if on_cuda else f" ({torch.get_num_threads()} torch threads; cpu kernels: {cpu_kernels_tag()}; "
                              f"torch's: {torch_cpu_capability()})"),
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {getattr(triton, '__version__', 'n/a')}, CUDA {torch.version.cuda or 'n/a'}"
        + (f", cuDNN {torch.backends.cudnn.version()}" if on_cuda else ""),
        f"- fused_attn {getattr(fused_attn, '__version__', '?')}, available backends: "
        f"{', '.join(available_fused_backends())}",
    ]
    if not on_cuda and hasattr(os, "getloadavg"):
        # CPU timings are only meaningful on an otherwise idle machine: a busy core stalls torch's
        # thread pool (medians then jump in multiples of the scheduler tick).
        lines.append(f"- load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if os.environ.get("FUSED_ATTN_BACKEND"):
        lines.append(f"- FUSED_ATTN_BACKEND={os.environ['FUSED_ATTN_BACKEND']}")
    if os.environ.get("TRITON_INTERPRET"):
        lines.append(f"- TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} (Triton kernels interpreted: not a speed)")
    elif on_cuda and "triton" in available_fused_backends():
        lines.append(f"- Triton tiles: {triton_tile_source()}")
    return lines


def triton_tile_source() -> str:
    """Where the Triton kernels' tiles come from in this run (fused_attn/triton/tuning.py)."""
    from fused_attn.triton import tuning

    mode = tuning.autotune_mode()
    if mode == "0":
        return "the fixed defaults (FUSED_ATTN_AUTOTUNE=0)"
    if mode == "force":
        return "every class tuned in this run (FUSED_ATTN_AUTOTUNE=force)"
    arch = tuning.device_info(torch.device("cuda")).arch
    shipped = len(tuning.shipped_choices(arch))
    return (f"{shipped} shipped choices for {arch}" if shipped else f"no shipped choices for {arch}") + \
        ", other classes tuned on their first call that fills the GPU"


def explain_once(cfg: Config, device: str) -> Optional[str]:
    """What fused_attn.explain says for one representative call (None if it has no explain)."""
    explain = getattr(fused_attn, "explain", None)
    if explain is None:
        return None
    q, k, v, _ = make_inputs(cfg, device, grad=False, n_sets=1)[0]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            result = explain(q, k, v, causal=cfg.causal)
    except Exception as exc:
        return f"explain() failed: {type(exc).__name__}: {exc}"
    text = buf.getvalue().strip()
    if result is not None:
        text = (text + "\n" + str(result)).strip()
    return text


# ----------------------------------------------------------------------------------------------
# Main


@dataclass
class Row:
    provider: str
    cfg: Config
    pass_: str
    ms: Optional[float] = None
    error: str = ""
    max_abs_diff: Optional[float] = None
    vs_sdpa: Optional[float] = None

    @property
    def tflops(self) -> Optional[float]:
        if self.ms is None or self.ms <= 0:
            return None
        return self.cfg.flops(self.pass_) / (self.ms * 1e-3) / 1e12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sweep: check that every provider runs")
    p.add_argument(
        "--providers",
        help="comma-separated providers (default on CUDA: fused_attn, fused_attn:cuda, sdpa_flash, sdpa_cudnn, "
        "sdpa_efficient, flash_attn where available; on CPU: fused_attn,sdpa,sdpa_math); see the module docstring",
    )
    p.add_argument("--out", type=Path, help="CSV path (default: bench.csv in --out-dir)")
    p.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results/<device>/)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of: fwd,fwd+bwd")
    p.add_argument("--seqlens", help="comma-separated sequence lengths (overrides the sweep's)")
    p.add_argument("--cpu-target-s", type=float, default=0.4, help="CPU: seconds of timed calls per row")
    p.add_argument("--no-check", action="store_true", help="skip the forward max|diff| check vs SDPA")
    return p.parse_args(argv)


def fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if on_cuda and triton is None:
        raise SystemExit("CUDA timing uses triton.testing.do_bench, but triton cannot be imported")
    device = "cuda" if on_cuda else "cpu"
    if not on_cuda and not (args.providers or args.seqlens or args.out):
        from . import bench_cpu

        return bench_cpu.main((["--quick"] if args.quick else []) + (["--out-dir", str(args.out_dir)] if args.out_dir else []))

    provider_names = args.providers.split(",") if args.providers else default_providers(on_cuda)
    providers = [make_provider(n.strip()) for n in provider_names if n.strip()]
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    bad = [p for p in passes if p not in PASSES]
    if bad:
        raise SystemExit(f"unknown pass(es) {bad}; choose from {PASSES}")

    configs = cuda_configs(args.quick) if on_cuda else cpu_configs(args.quick)
    if args.seqlens:
        wanted = [int(s) for s in args.seqlens.split(",")]
        base = {(c.dtype, c.causal, c.H, c.D) for c in configs}
        tokens = 16384 if on_cuda else None
        configs = [
            Config(dtype, causal, (max(1, tokens // L) if tokens else 1), H, L, D)
            for (dtype, causal, H, D) in sorted(base, key=lambda t: (str(t[0]), t[3], t[1]))
            for L in wanted
        ]

    baseline_name = next(
        (n for n in (["sdpa_flash", "sdpa"] if on_cuda else ["sdpa"]) if n in [p.name for p in providers]),
        next((p.name for p in providers if p.is_sdpa), None),
    )
    baseline = next((p for p in providers if p.name == baseline_name), None)
    check_ref = baseline or make_provider("sdpa")

    header = ["# fused_attn benchmark", ""] + environment_lines(on_cuda)
    explanation = explain_once(configs[0], device)
    print("\n".join(header), flush=True)
    if explanation:
        print(f"\nfused_attn.explain() for {configs[0]}:\n" + explanation, flush=True)

    torch.manual_seed(0)
    if not on_cuda:
        # Let thread pools and allocators settle before the first timed row (the first seconds of
        # a CPU run measured several times slower otherwise).
        warm = make_inputs(configs[0], device, grad=False, n_sets=1)[0][:3]
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            for prov in providers:
                with contextlib.suppress(Exception), torch.no_grad(), prov.context():
                    prov.fn(*warm, configs[0].causal)
    rows: list[Row] = []
    t_start = time.perf_counter()
    from benchmarks.common import out_of_time  # (common imports this module)

    for cfg in goals_first(configs):  # so that a time budget spent early still leaves the goals' rows
        if out_of_time():
            break
        for pass_ in passes:
            try:
                sets = make_inputs(cfg, device, grad=(pass_ == "fwd+bwd"))
            except Exception as exc:  # e.g. out of memory for the inputs themselves
                for prov in providers:
                    rows.append(Row(prov.name, cfg, pass_, error=f"inputs: {type(exc).__name__}: {exc}"))
                continue
            for prov in providers:
                row = Row(prov.name, cfg, pass_)
                try:
                    step = make_step(prov, cfg, sets, pass_)
                    with prov.context():
                        if on_cuda:
                            row.ms = time_cuda(step, sets, warmup_ms=25, rep_ms=100)
                        else:
                            row.ms = time_cpu(step, sets, target_s=args.cpu_target_s)
                    if pass_ == "fwd" and not prov.is_sdpa and not args.no_check:
                        row.max_abs_diff = max_abs_diff(prov, cfg, sets, check_ref)
                except Exception as exc:
                    msg = str(exc).strip().splitlines()
                    row.error = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200]
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                    if on_cuda:
                        torch.cuda.empty_cache()  # e.g. after an out-of-memory error
                rows.append(row)
                print(
                    f"  [{time.perf_counter() - t_start:7.1f}s] {prov.name:<22} {cfg.dtype_name:<8} "
                    f"causal={cfg.causal!s:<5} B={cfg.B:<3} H={cfg.H:<3} L={cfg.L:<5} D={cfg.D:<4} "
                    f"{pass_:<7} {fmt(row.ms, '.3f')} ms" + (f"  ({row.error})" if row.error else ""),
                    file=sys.stderr,
                    flush=True,
                )
            del sets
            if on_cuda:
                torch.cuda.empty_cache()

    sweep_order = {cfg: i for i, cfg in enumerate(configs)}
    rows.sort(key=lambda r: sweep_order[r.cfg])  # (stable: passes and providers keep their order)
    # ratio vs the SDPA baseline row of the same config and pass
    base_ms = {(r.cfg, r.pass_): r.ms for r in rows if r.provider == baseline_name}
    for r in rows:
        b = base_ms.get((r.cfg, r.pass_))
        if r.ms and b:
            r.vs_sdpa = b / r.ms

    table = [
        "",
        f"vs_sdpa = time of `{baseline_name}` / time of the row (>1: faster). "
        "TFLOP/s: fwd 4*B*H*L^2*D (causal /2), fwd+bwd 3.5x that. max|diff|: fwd output vs "
        f"`{check_ref.name}`.",
        "",
        "| provider | dtype | causal | B | H | L | D | pass | median ms | TFLOP/s | vs_sdpa | max\\|diff\\| |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.cfg
        table.append(
            f"| {r.provider} | {c.dtype_name} | {c.causal} | {c.B} | {c.H} | {c.L} | {c.D} | {r.pass_} | "
            f"{fmt(r.ms, '.3f')} | {fmt(r.tflops, '.2f' if on_cuda else '.4f')} | {fmt(r.vs_sdpa, '.2f')} | "
            f"{fmt(r.max_abs_diff, '.2e')} |"
        )
    errors = [r for r in rows if r.error]
    if errors:
        table += ["", "n/a rows:"]
        seen = set()
        for r in errors:
            key = (r.provider, r.error)
            if key not in seen:
                seen.add(key)
                table.append(f"- {r.provider}: {r.error}")
    if on_cuda:
        table += goal_lines(rows)
    print("\n".join(table), flush=True)

    out = args.out or ((args.out_dir or RESULTS_DIR / device_slug(on_cuda)) / ("bench-quick.csv" if args.quick
                                                                                else "bench.csv"))
    if not rows:  # (an earlier run's results are not replaced by an empty table)
        print(f"\nno row was measured (time budget spent): {out} not written", flush=True)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    env = [device_name(on_cuda), torch.__version__, getattr(triton, "__version__", ""), torch.version.cuda or ""]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["provider", "dtype", "causal", "B", "H", "L", "D", "pass", "median_ms", "tflops",
             "vs_sdpa", "max_abs_diff", "error", "device", "torch", "triton", "cuda"]
        )
        for r in rows:
            c = r.cfg
            w.writerow(
                [r.provider, c.dtype_name, c.causal, c.B, c.H, c.L, c.D, r.pass_,
                 "" if r.ms is None else f"{r.ms:.4f}",
                 "" if r.tflops is None else f"{r.tflops:.4f}",
                 "" if r.vs_sdpa is None else f"{r.vs_sdpa:.3f}",
                 "" if r.max_abs_diff is None else f"{r.max_abs_diff:.3e}",
                 r.error] + env
            )
    md = out.with_suffix(".md")
    md.write_text("\n".join(header + table) + "\n")
    print(f"\nwrote {out} and {md} ({time.perf_counter() - t_start:.0f}s)", flush=True)
    for note in plots.render(out):
        print(note, flush=True)
    return 0


if __name__ == "__main__":
    from benchmarks.suites import cli  # --suite speed|memory|masked|decode|varlen|all (default all)

    sys.exit(cli(main))
