"""Every Triton kernel compiles for Ampere and Hopper, checked without a GPU.

The interpreter that runs the kernels in CPU CI never compiles them; this runs Triton's compiler
(in a subprocess, with the interpreter off) down to a cubin for sm_80 and sm_90.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("aot_compile.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the whole suite runs the compiled kernels")
@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_gpu(capability):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, str(SCRIPT), str(capability)], capture_output=True, text=True, env=env,
                            cwd=SCRIPT.parent.parent, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 11, result.stdout
