"""PNG plots of benchmark results, drawn from their CSV files.

    python -m benchmarks.plots                       # every CSV under benchmarks/results/
    python -m benchmarks.plots benchmarks/results/nvidia-h200   # one folder (or CSV files)
    make plots                                       # the same, installing matplotlib into .venv first

Each suite calls render() on the CSV it has just written, so a run on a machine with matplotlib
plots at once. The GPU machine has neither matplotlib nor a package index: its results are
plotted afterwards, from the committed CSVs, on a machine that has them. Which figures a CSV gets
depends on its suite, named by the file (bench*.csv, bench_cpu*.csv, decode*, memory*, varlen*);
the masked suite's cases are a table, not a sweep, and get none.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class Figure:
    suffix: str  # appended to the CSV's stem: <stem><suffix>.png
    series: dict  # (name, variant) -> (xs, ys); a name keeps one colour, a variant one line style
    xlabel: str
    ylabel: str
    title: str
    logy: bool = False


def _value(text: str):
    """A CSV cell as the suites wrote it: int, float, bool, None (empty) or the string."""
    if text in ("", "n/a"):  # no value: a failed row, or one a time budget skipped
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{key: _value(value) for key, value in row.items()} for row in csv.DictReader(f)]


def _unique(rows, key):
    return list(dict.fromkeys(r[key] for r in rows))


def _line(rows, x, y, scale=1.0):
    """(xs, ys) of the rows with a y value, sorted by x."""
    points = sorted((r[x], r[y] * scale) for r in rows if r.get(y) is not None)
    return [p[0] for p in points], [p[1] for p in points]


def speed_figures(rows):
    """bench.py: TFLOP/s against L, one figure per dtype, head dim and pass."""
    figures = []
    for dtype in _unique(rows, "dtype"):
        for dim in _unique(rows, "D"):
            for pass_ in _unique(rows, "pass"):
                mine = [r for r in rows if r["dtype"] == dtype and r["D"] == dim and r["pass"] == pass_]
                series = {(p, "causal" if c else ""): _line([r for r in mine if r["provider"] == p
                                                             and r["causal"] == c], "L", "tflops")
                          for p in _unique(mine, "provider") for c in _unique(mine, "causal")}
                figures.append(Figure(f"-{dtype}-d{dim}-{pass_}", series, "sequence length L", "TFLOP/s",
                                      f"{pass_}, {dtype}, head dim {dim}, {mine[0]['device']}"))
    return figures


def cpu_figures(rows):
    """bench_cpu.py: time against L for the cpu backend and torch's flash and math kernels."""
    figures = []
    labels = {"cpu_ms": "fused_attn cpu", "flash_ms": "sdpa flash", "math_ms": "sdpa math"}
    for dtype in _unique(rows, "dtype"):
        for pass_ in _unique(rows, "pass"):
            mine = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_]
            series = {(label, "causal" if c else ""): _line([r for r in mine if r["causal"] == c], "L", column)
                      for column, label in labels.items() for c in _unique(mine, "causal")}
            figures.append(Figure(f"-{dtype}-{pass_}", series, "sequence length L", "ms", f"{pass_}, {dtype}, CPU",
                                  logy=True))
    return figures


def decode_figures(rows):
    first = rows[0]
    series = {(p, f"B={b}"): _line([r for r in rows if r["provider"] == p and r["B"] == b], "L", "gbs")
              for p in _unique(rows, "provider") for b in _unique(rows, "B")}
    return [Figure("", series, "cache length", "K/V GB/s",
                   f"decode Hq={first['Hq']} Hkv={first['Hkv']} D={first['D']} (copy {first['copy_gbs']:.0f} GB/s)")]


def memory_figures(rows):
    first = rows[0]
    series = {(p, ""): _line([r for r in rows if r["provider"] == p], "L", "fwdbwd_bytes", 2.0 ** -20)
              for p in _unique(rows, "provider")}
    return [Figure("", series, "sequence length L", "fwd+bwd peak MiB (above inputs)",
                   f"peak memory, B=1 H={first['H']} D={first['D']} {first['dtype']}", logy=True)]


def varlen_figures(rows):
    last_pass = _unique(rows, "pass")[-1]
    mine = [r for r in rows if r["pass"] == last_pass and r["provider"] != "all"]
    series = {(p, "causal" if c else ""): _line([r for r in mine if r["provider"] == p and r["causal"] == c],
                                                "L", "us_per_token")
              for p in _unique(mine, "provider") for c in _unique(mine, "causal")}
    return [Figure("", series, "max sequence length L", f"{last_pass} us / real token",
                   f"varlen vs padded, ~{max(r['tokens'] for r in mine)} tokens H={mine[0]['H']} D={mine[0]['D']}",
                   logy=True)]


# File stem prefix -> figures; the longest matching prefix wins (bench_cpu before bench).
SUITES = {"bench_cpu": cpu_figures, "bench": speed_figures, "decode": decode_figures,
          "memory": memory_figures, "varlen": varlen_figures}


def figures_of(csv_path: Path, rows: list[dict]) -> list[Figure]:
    matches = [prefix for prefix in SUITES if csv_path.stem.startswith(prefix)]
    if not matches or not rows:
        return []
    return SUITES[max(matches, key=len)](rows)


def render(csv_path: Path) -> list[str]:
    """Draw the figures of one results CSV next to it; returns a line per figure (or why none)."""
    csv_path = Path(csv_path)
    figures = figures_of(csv_path, read_rows(csv_path))
    if not figures:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [f"(no PNG plot of {csv_path.name}: matplotlib is not installed; `make plots` draws them later)"]
    notes = []
    for figure in figures:
        path = csv_path.with_name(csv_path.stem + figure.suffix + ".png")
        fig, ax = plt.subplots(figsize=(8, 5))
        names = list(dict.fromkeys(name for name, _ in figure.series))
        variants = list(dict.fromkeys(variant for _, variant in figure.series))
        for (name, variant), (xs, ys) in figure.series.items():
            if xs:
                ax.plot(xs, ys, marker="o", color=plt.cm.tab10(names.index(name) % 10),
                        linestyle=LINE_STYLES[variants.index(variant) % len(LINE_STYLES)],
                        label=f"{name} {variant}".strip())
        ax.set_xscale("log", base=2)
        if figure.logy:
            ax.set_yscale("log")
        ax.set_xlabel(figure.xlabel)
        ax.set_ylabel(figure.ylabel)
        ax.set_title(figure.title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        notes.append(f"plot: {path}")
    return notes


def main(argv=None) -> int:
    targets = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [RESULTS_DIR]
    csvs = sorted(p for t in targets for p in ([t] if t.is_file() else t.rglob("*.csv")))
    for path in csvs:
        for note in render(path):
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
