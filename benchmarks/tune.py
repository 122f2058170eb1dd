"""Tune the Triton kernels' tiles on this GPU and ship the choices in
fused_attn/triton/tuned/sm<major><minor>.json, which fused_attn then reads on every GPU of the
same architecture instead of tuning (fused_attn/triton/tuning.py).

    python -m benchmarks.tune              # every shape class the benchmarks use (about 3 minutes)
    python -m benchmarks.tune --dry-run    # the same, without writing the file
    python -m benchmarks.tune --calls "speed d128,speed d128 causal"   # some calls: their classes only

One representative call per benchmark (bench.py's speed sweep, bench_masked.py's bias gradient,
bench_decode.py) runs with FUSED_ATTN_AUTOTUNE=force, so the library's own tuner times every
candidate of each shape class the call touches, ignoring the shipped choices. The new choices are
merged into the architecture's file (classes not tuned here keep theirs); then each call runs again
with them and is checked against torch SDPA, and a table of the gains ends the output.

Compiling the candidates is most of the time (1 to 10 s each, single-threaded). So first --jobs
worker processes (one per candidate rank: worker i compiles the i-th candidate of every class) fill
Triton's on-disk cache, and the timing pass then loads compiled kernels.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton

import fused_attn
from fused_attn.triton import tuning

DEVICE = "cuda"
# The speed sweep keeps batch x length at 16k tokens; length 4096 stands for it and for the masked
# suite (tiles are keyed by shape class, not by length).
TOKENS = 16384
LENGTH = 4096
CACHE_LENGTH = 32768


def attention_call(head_dim, causal=False, bias=False):
    """Forward and backward of bench.py's sweep (hidden size 2048, bf16), or bench_masked.py's bias case."""
    heads = 2048 // head_dim
    shape = (TOKENS // LENGTH, heads, LENGTH, head_dim)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, heads, LENGTH, LENGTH, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) if bias \
        else None
    dout = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)

    def run(attention):
        out = attention(q, k, v, attn_mask=mask, is_causal=causal)
        leaves = (q, k, v) if mask is None else (q, k, v, mask)
        return (out, *torch.autograd.grad(out, leaves, dout))

    def ours(q, k, v, attn_mask, is_causal):
        return fused_attn.attention(q, k, v, attn_mask=attn_mask, causal=is_causal, backend="triton")

    return functools.partial(run, ours), functools.partial(run, F.scaled_dot_product_attention)


def decode_call():
    """bench_decode.py: one new token, Hq 32, Hkv 8, D 128, bf16, a full 32k contiguous cache, B 4."""
    batch, heads_q, heads_kv, head_dim = 4, 32, 8, 128
    q = torch.randn(batch, 1, heads_q, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(batch, CACHE_LENGTH, heads_kv, head_dim, device=DEVICE, dtype=torch.bfloat16)
                        for _ in range(2))

    def ours():
        return (fused_attn.attention_with_kvcache(q, k_cache, v_cache, CACHE_LENGTH, backend="triton"),)

    def sdpa():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                             enable_gqa=True)
        return (out.transpose(1, 2),)

    return ours, sdpa


CALLS = {
    "speed d64": functools.partial(attention_call, 64),
    "speed d64 causal": functools.partial(attention_call, 64, causal=True),
    "speed d128": functools.partial(attention_call, 128),
    "speed d128 causal": functools.partial(attention_call, 128, causal=True),
    "masked bias grad d128": functools.partial(attention_call, 128, bias=True),
    "decode d128 32k": decode_call,
}


def candidates_of_rank(rank: int):
    """tuning.candidates cut to each class's rank-th candidate (its default where it has fewer)."""
    every = tuning.candidates

    def ranked(shape: tuning.ShapeClass, major: int, tma: bool = True) -> tuple[tuning.TileConfig, ...]:
        found = every(shape, major, tma)
        return found[rank:rank + 1] or found[:1]

    return ranked


def compile_worker(names: list[str], rank: int) -> None:
    """Compile the rank-th candidate of every class the calls touch (Triton caches it on disk)."""
    tuning.candidates = candidates_of_rank(rank)
    for name in names:
        CALLS[name]()[0]()
    torch.cuda.synchronize()


def precompile(names: list[str], jobs: int) -> None:
    env = dict(os.environ, **{tuning.ENV_VARIABLE: "force"})
    command = [sys.executable, "-m", "benchmarks.tune", "--calls", ",".join(names), "--compile-rank"]
    workers = [subprocess.Popen([*command, str(rank)], env=env) for rank in range(jobs)]
    if any(worker.wait() for worker in workers):
        raise SystemExit("a compile worker failed (its error is above)")


@torch.no_grad()
def relative_error(ours, reference) -> float:
    return max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(ours, reference))


def write_choices(path, info, tuned, tuned_on) -> None:
    """Merge the new choices into the architecture's file: classes not tuned now keep theirs."""
    shipped = json.loads(path.read_text())["choices"] if path.exists() else {}
    shipped.update({key: tuning.choice_entry(choice, tuned_on[key]) for key, choice in tuned.items()})
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({
        "arch": info.arch, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "date": datetime.date.today().isoformat(),
        "written_by": "python -m benchmarks.tune", "choices": dict(sorted(shipped.items())),
    }, indent=1) + "\n")


def report(info, tuned, tuned_on, errors) -> None:
    print(f"\n{torch.cuda.get_device_name()} ({info.arch}): tiles per shape class, median ms of the kernel on "
          "the call it was tuned on\n")
    print("| shape class | tuned on | tiles | ms | default | default ms | gain |")
    print("|---|---|---|---:|---|---:|---:|")
    for key, choice in sorted(tuned.items()):
        ms, default_ms = choice.timings.get(choice.tiles), choice.timings.get(choice.default)
        gain = f"{default_ms / ms:.2f}x" if ms and default_ms else "n/a"
        print(f"| {key} | {tuned_on[key]} | {choice.tiles} | {ms or float('nan'):.3f} | {choice.default} | "
              f"{default_ms or float('nan'):.3f} | {gain} |")
    refused = [(key, tiles, why) for key, choice in sorted(tuned.items()) for tiles, why in choice.failed.items()]
    if refused:
        print("\nCandidates the compiler refused (skipped):\n")
        print("| shape class | tiles | error |")
        print("|---|---|---|")
        for key, tiles, why in refused:
            print(f"| {key} | {tiles} | {why} |")
    print("\n| call | max relative error vs torch SDPA (out and every gradient) |")
    print("|---|---:|")
    for name, error in errors.items():
        print(f"| {name} | {error:.2e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tune and report, but write no file")
    parser.add_argument("--jobs", type=int, default=min(10, os.cpu_count() or 1),
                        help="compile workers (default: 10, the most candidates a class has, or the CPU count)")
    parser.add_argument("--calls", default=",".join(CALLS),
                        help=f"comma-separated subset of the calls (default: all of {', '.join(CALLS)})")
    parser.add_argument("--compile-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.calls.split(",") if name.strip()]
    if unknown := set(names) - set(CALLS):
        raise SystemExit(f"unknown calls {sorted(unknown)}; choose from {', '.join(CALLS)}")
    if not torch.cuda.is_available() or tuning.INTERPRETING:
        raise SystemExit("benchmarks.tune needs a CUDA GPU (and TRITON_INTERPRET unset)")
    os.environ[tuning.ENV_VARIABLE] = "force"
    if args.compile_rank is not None:
        compile_worker(names, args.compile_rank)
        return 0

    info = tuning.device_info(torch.device(DEVICE))
    start = time.perf_counter()
    if args.jobs > 1:
        precompile(names, args.jobs)
    print(f"compiled in {time.perf_counter() - start:.0f}s", flush=True)
    tuned_on, calls = {}, {}
    for name in names:
        calls[name] = CALLS[name]()
        calls[name][0]()
        for key in tuning.tuned_choices(info.arch):
            tuned_on.setdefault(key, name)
    torch.cuda.synchronize()
    print(f"tuned in {time.perf_counter() - start:.0f}s", flush=True)

    os.environ[tuning.ENV_VARIABLE] = "1"  # the choices just made, as users will get them
    errors = {name: relative_error(ours(), sdpa()) for name, (ours, sdpa) in calls.items()}
    tuned = tuning.tuned_choices(info.arch)
    report(info, tuned, tuned_on, errors)
    if max(errors.values()) > 2e-2:
        print("\nnot written: a call is off from torch SDPA by more than bf16 rounding explains")
        return 1
    path = tuning.TUNED_DIR / f"{info.arch}.json"
    if not args.dry_run:
        write_choices(path, info, tuned, tuned_on)
    print(f"\n{'dry run: nothing written' if args.dry_run else f'wrote {path}'} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
