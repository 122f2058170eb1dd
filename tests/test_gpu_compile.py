"""Every Triton kernel, and every tile configuration tuning may pick, compiles for Ampere and
Hopper, checked without a GPU.

The interpreter that runs the kernels in CPU CI never compiles them; tests/aot_compile.py runs
Triton's compiler (in a subprocess, with the interpreter off) down to a cubin for sm_80 and sm_90.
Both architectures compile at once, one process each: CI has two cores.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("aot_compile.py")
CAPABILITIES = (80, 90)


@pytest.fixture(scope="module")
def compilers():
    """One running aot_compile.py per architecture, started together."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    processes = {capability: subprocess.Popen([sys.executable, str(SCRIPT), str(capability)], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, env=env, cwd=SCRIPT.parent.parent)
                 for capability in CAPABILITIES}
    yield processes
    for process in processes.values():
        process.kill()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the whole suite runs the compiled kernels")
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_kernels_and_tile_candidates_compile_for_gpu(compilers, capability):
    stdout, stderr = compilers[capability].communicate(timeout=1500)
    assert compilers[capability].returncode == 0, stderr[-4000:]
    jobs = int(stdout.split(" jobs", 1)[0])
    assert jobs > 11 and stdout.count("compiled") == jobs, stdout
