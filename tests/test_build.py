"""setup.py's build of the C++ extension when it fails: the install goes on without it and says
why, unless FUSED_ATTN_NATIVE=1 requires it. (Here, not in test_native.py: the sanitized runs
select that file's tests, and these build a copy of the sources in a subprocess.)"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _copy_of_the_sources(tmp_path):
    """setup.py, csrc/ and the package (no compiled files) in tmp_path: a checkout to build."""
    shutil.copy(REPO / "setup.py", tmp_path)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_native_build.txt", "_native_cuda.txt")
    for folder in ("csrc", "fused_attn"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=ignore)
    return tmp_path


def _build(tree, **environment):
    """`setup.py build_ext --inplace` in tree, with a C++ compiler that fails (false)."""
    env = {name: value for name, value in os.environ.items() if name != "FUSED_ATTN_NATIVE"}
    env.update(CXX="false", CC="false", FUSED_ATTN_CUDA="0", **environment)
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_failed_build_installs_without_the_extension_and_says_why(tmp_path):
    """A compiler that cannot build the extension (no OpenMP, no GCC options, none at all) does
    not fail the install: the build warns, setup.py records why, and the package, imported from
    that tree, reports it as the cpu backend's reason and runs on the next backend."""
    tree = _copy_of_the_sources(tmp_path)
    built = _build(tree)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "C++ extension was not built" in built.stderr
    note = (tree / "fused_attn" / "_native_build.txt").read_text()
    assert note.startswith("its build failed: ")
    assert not list((tree / "fused_attn").glob("_native*.so"))
    # The editable install's finder would find this checkout's extension: left out here.
    script = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n"
        "import warnings, torch, fused_attn\n"
        "from fused_attn.backends import BACKENDS\n"
        "assert fused_attn.__file__.startswith(sys.argv[1]), fused_attn.__file__\n"
        "print(BACKENDS['cpu'].unavailable_reason())\n"
        "q = torch.randn(1, 2, 8, 16)\n"
        "print(fused_attn.explain(q, q, q).splitlines()[0])\n"
        "torch.testing.assert_close(fused_attn.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tree)], cwd=tree, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    reason, chosen = run.stdout.strip().splitlines()[-2:]
    assert reason.startswith("fused_attn._native is not built: its build failed: ")
    assert "pip install" in reason
    assert chosen in ("would run: triton", "would run: reference")  # (triton under TRITON_INTERPRET=1)


def test_a_failed_build_is_an_error_where_the_extension_is_required(tmp_path):
    """FUSED_ATTN_NATIVE=1 (make's installs) turns a failed build into a failed install."""
    built = _build(_copy_of_the_sources(tmp_path), FUSED_ATTN_NATIVE="1")
    assert built.returncode != 0
    assert "C++ extension was not built" not in built.stderr
