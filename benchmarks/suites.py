"""`python -m benchmarks.bench --suite ...`: choose among the benchmark suites.

    --suite speed      benchmarks/bench.py's own sweep (fused_attn vs torch SDPA, fwd and fwd+bwd)
    --suite memory     benchmarks/bench_memory.py  (peak memory vs L, longest L before OOM)
    --suite masked     benchmarks/bench_masked.py  (padding mask, bias gradient, causal, window)
    --suite decode     benchmarks/bench_decode.py  (KV-cache decoding bandwidth, contiguous and paged)
    --suite varlen     benchmarks/bench_varlen.py  (packed batches vs padded dense)
    --suite overhead   benchmarks/bench_overhead.py  (host time per call on tiny inputs)
    --suite all        every suite (the default); a comma-separated list also works
    --full             CPU only: larger sizes for the non-speed suites (their CPU default is short)
    --budget-s N       a time budget for the whole run, in seconds (a lent GPU's minutes are few):
                       each suite gets a share of what is left when it starts (WEIGHTS), starts no
                       new row once its share is spent, and writes the rows it has (none: no files,
                       so earlier results stay); a share under MIN_SUITE_S skips the suite

--quick, --device and --out-dir go to every suite. With one suite, all other arguments go to it; with several,
the other arguments go to the speed suite (as before), and each suite runs in its own subprocess so
that an out-of-memory or a kernel fault in one cannot spoil the next (and no suite inherits
another's cached GPU memory).
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks import common

SUITES = ("speed", "memory", "masked", "decode", "varlen", "overhead")
# Each suite's share of a --budget-s run: of the time left when it starts, its weight over the
# weights of the suites still to run (so time one suite leaves unused goes to the next ones).
WEIGHTS = {"speed": 4.0, "memory": 1.0, "masked": 2.0, "decode": 2.0, "varlen": 1.0, "overhead": 0.5}
# A suite given less than this of a --budget-s run is skipped: starting one (a subprocess that
# imports torch and builds its inputs) takes ~5 s before its first row.
MIN_SUITE_S = 15.0
MODULES = {"memory": "benchmarks.bench_memory", "masked": "benchmarks.bench_masked",
           "decode": "benchmarks.bench_decode", "varlen": "benchmarks.bench_varlen",
           "overhead": "benchmarks.bench_overhead"}
REPO = Path(__file__).resolve().parent.parent


def _selected(text: str | None) -> list[str]:
    if not text or text == "all":
        return list(SUITES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if "all" in names:
        return list(SUITES)
    bad = [n for n in names if n not in SUITES]
    if bad:
        raise SystemExit(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)} or all")
    return [s for s in SUITES if s in names]


def cli(speed_main: Callable[[list[str]], int], argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--suite")
    p.add_argument("--full", action="store_true")
    p.add_argument("--budget-s", type=float)
    p.add_argument("-h", "--help", action="store_true")
    known, rest = p.parse_known_args(argv)
    end = None if known.budget_s is None else time.time() + known.budget_s
    if known.help:
        print(__doc__)
        print("Arguments of the speed suite:\n")
        speed_main(["--help"])  # exits
        return 0
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--quick", action="store_true")
    peek.add_argument("--device")
    peek.add_argument("--out-dir")
    shared, _ = peek.parse_known_args(rest)
    common_args = ((["--quick"] if shared.quick else []) + (["--device", shared.device] if shared.device else [])
                   + (["--out-dir", shared.out_dir] if shared.out_dir else []))
    suites = _selected(known.suite)

    if len(suites) == 1:
        name = suites[0]
        if end is not None:
            os.environ[common.DEADLINE_VARIABLE] = str(end)
        if name == "speed":
            return speed_main(rest)
        args = rest + (["--full"] if known.full else [])
        return importlib.import_module(MODULES[name]).main(args)

    extra = [a for a in rest if a not in common_args]  # (--out-dir and its value included)
    if extra and "speed" not in suites:
        raise SystemExit(f"arguments {extra} need a single --suite (they are passed to that suite only)")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    summary, rc_all = [], 0
    for i, name in enumerate(suites):
        if name == "speed":
            args = rest
        else:
            args = common_args + (["--full"] if known.full else [])
        if end is not None:
            share = WEIGHTS[name] / sum(WEIGHTS[later] for later in suites[i:])
            seconds = max(0.0, end - time.time()) * share
            if seconds < MIN_SUITE_S:  # it would start and stop before its first row
                summary.append(f"- {name}: skipped ({seconds:.0f}s of the time budget left for it; results not written)")
                continue
            env[common.DEADLINE_VARIABLE] = str(time.time() + seconds)
        cmd = [sys.executable, "-m", "benchmarks.bench", "--suite", name] + args
        print(f"\n===== suite {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO, env=env)
        summary.append(f"- {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f}s")
        rc_all = rc_all or rc
    print("\n===== suites\n" + "\n".join(summary), flush=True)
    return rc_all
