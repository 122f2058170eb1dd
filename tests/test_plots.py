"""benchmarks/plots.py: the figures each suite's CSV gets, drawn from the CSV alone."""
import csv
import importlib.util
import sys

from benchmarks import plots


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def speed_rows():
    return [dict(provider=p, dtype="bfloat16", causal=c, B=16384 // L, H=16, L=L, D=128, **{"pass": "fwd"},
                 median_ms=1.0, tflops="" if (p, L) == ("sdpa_math", 8192) else L / 100, device="GPU")
            for p in ("fused_attn:triton", "sdpa_math") for c in (False, True) for L in (1024, 8192, 512)]


def test_speed_csv_gets_one_figure_per_dtype_dim_and_pass_with_sorted_points(tmp_path):
    path = write_csv(tmp_path / "bench.csv", speed_rows())
    figures = plots.figures_of(path, plots.read_rows(path))
    assert [f.suffix for f in figures] == ["-bfloat16-d128-fwd"]
    series = figures[0].series
    assert set(series) == {("fused_attn:triton", ""), ("fused_attn:triton", "causal"), ("sdpa_math", ""),
                           ("sdpa_math", "causal")}
    assert series[("fused_attn:triton", "causal")] == ([512, 1024, 8192], [5.12, 10.24, 81.92])
    assert series[("sdpa_math", "")] == ([512, 1024], [5.12, 10.24])  # the failed row (empty) is left out


def test_suites_are_told_apart_by_file_name(tmp_path):
    cpu_rows = [dict(dtype="float32", causal=False, B=1, H=4, L=512, D=64, **{"pass": "fwd"}, cpu_ms=1.5,
                     flash_ms=2.0, math_ms=3.0, vs_flash=1.3, vs_math=2.0)]
    path = write_csv(tmp_path / "bench_cpu-2thread.csv", cpu_rows)
    figures = plots.figures_of(path, plots.read_rows(path))
    assert figures[0].series[("sdpa flash", "")] == ([512], [2.0])
    assert plots.figures_of(tmp_path / "masked.csv", cpu_rows) == []


def test_render_writes_a_png_per_figure_or_says_why_not(tmp_path):
    """Without matplotlib (CI, the GPU machine) the note says so and `make plots` draws them later."""
    path = write_csv(tmp_path / "bench.csv", speed_rows())
    notes = plots.render(path)
    png = tmp_path / "bench-bfloat16-d128-fwd.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert len(notes) == 1 and "matplotlib is not installed" in notes[0] and not png.exists()
    else:
        assert notes == [f"plot: {png}"] and png.read_bytes().startswith(b"\x89PNG")


def test_without_matplotlib_nothing_is_drawn_and_the_note_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    path = write_csv(tmp_path / "bench.csv", speed_rows())
    notes = plots.render(path)
    assert len(notes) == 1 and "`make plots`" in notes[0] and not list(tmp_path.glob("*.png"))
