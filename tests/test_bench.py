"""benchmarks/bench.py's GPU summary, checked without a GPU: the goal lines read from a sweep's rows
(GPU runs are rare, so a summary that breaks on their rows would waste one), and the providers a
CUDA sweep compares by default."""
import json

import pytest
import torch

from benchmarks import bench


def sweep_rows(ms_of):
    """Rows of the CUDA sweep's bf16 configurations; ms_of(provider, D, L, causal, pass) gives each
    row's time (None: the row failed)."""
    rows = []
    for provider in ("fused_attn", "fused_attn:cuda", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"):
        for D in (64, 128):
            for L in (512, 4096):
                for causal in (False, True):
                    for pass_ in bench.PASSES:
                        row = bench.Row(provider, bench.Config(torch.bfloat16, causal, 16384 // L, 2048 // D, L, D),
                                        pass_)
                        row.ms = ms_of(provider, D, L, causal, pass_)
                        rows.append(row)
    return rows


def test_goal_lines_take_the_worst_of_causal_and_not():
    def ms_of(provider, D, L, causal, pass_):
        if provider == "fused_attn":
            return 1.0 if not causal else 1.25  # causal is the worse of the two
        return {"sdpa_flash": 1.3, "sdpa_cudnn": 0.8, "fused_attn:cuda": 2.0, "sdpa_efficient": 2.1}[provider]

    lines = bench.goal_lines(sweep_rows(ms_of))
    by_name = {line.split(":")[0]: line for line in lines if line.startswith("- ")}
    forward = by_name["- fused_attn forward vs SDPA flash (D=128, L=4096)"]
    assert "1.04 (target >= 1.20) **MISSED**" in forward  # 1.3 / 1.25, not 1.3 / 1.0
    assert "1.04 (target >= 1.00) **met**" in by_name["- fused_attn forward+backward vs SDPA flash (D=128, L=4096)"]
    assert "0.64 (target >= 0.90) **MISSED**" in by_name["- fused_attn stretch"]
    assert "1.05 (target >= 1.00) **met**" in by_name["- fused_attn"]
    assert len(by_name) == len(bench.GPU_GOALS)


def test_goal_lines_say_n_a_where_rows_are_missing():
    lines = bench.goal_lines(sweep_rows(lambda provider, *_: None if provider == "sdpa_cudnn" else 1.0))
    cudnn = next(line for line in lines if "cuDNN" in line)
    assert "n/a" in cudnn and "1.00 (target >= 1.10) **MISSED**" in next(line for line in lines if "D=64" in line)


def test_cuda_sweep_compares_the_goals_providers(monkeypatch):
    monkeypatch.setattr(bench, "available_fused_backends", lambda: ["triton", "cuda", "reference"])
    providers = bench.default_providers(on_cuda=True)
    needed = {provider for _, provider, against, *_ in bench.GPU_GOALS} | {
        against for _, _, against, *_ in bench.GPU_GOALS}
    assert needed <= set(providers)
    monkeypatch.setattr(bench, "available_fused_backends", lambda: ["triton", "reference"])
    assert "fused_attn:cuda" not in bench.default_providers(on_cuda=True)
    for name in bench.default_providers(on_cuda=True):
        assert bench.make_provider(name).name == name


def test_unknown_provider_is_refused():
    with pytest.raises(ValueError, match="unknown provider"):
        bench.make_provider("sdpa_fast")


def test_gpu_results_say_where_the_triton_tiles_came_from(monkeypatch, tmp_path):
    """A GPU run's header records whether its Triton figures ran tuned tiles or the fixed defaults
    (benchmarks/device_check.sh runs the defaults while no choices are shipped for the GPU)."""
    from fused_attn.triton import tuning

    monkeypatch.setattr(tuning, "device_info", lambda device: tuning.DeviceInfo("sm90", 9, 132, 232448))
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    tuning.shipped_choices.cache_clear()
    monkeypatch.setenv(tuning.ENV_VARIABLE, "0")
    assert bench.triton_tile_source() == "the fixed defaults (FUSED_ATTN_AUTOTUNE=0)"
    monkeypatch.setenv(tuning.ENV_VARIABLE, "1")
    assert bench.triton_tile_source().startswith("no shipped choices for sm90, other classes tuned")
    choice = tuning.Tuned(tuning.TileConfig(128, 64, 8, 2), tuning.TileConfig(128, 64, 8, 2), {})
    (tmp_path / "sm90.json").write_text(json.dumps({"choices": {"forward/d128/16bit/full": tuning.choice_entry(choice, "t")}}))
    tuning.shipped_choices.cache_clear()
    assert bench.triton_tile_source().startswith("1 shipped choices for sm90")
    monkeypatch.setenv(tuning.ENV_VARIABLE, "force")
    assert bench.triton_tile_source() == "every class tuned in this run (FUSED_ATTN_AUTOTUNE=force)"
    tuning.shipped_choices.cache_clear()


def test_a_time_budget_is_shared_out_and_stops_suites(monkeypatch, tmp_path):
    """make bench ARGS="--budget-s N" (a lent GPU's minutes are few): each suite gets its weight's
    share of the time left when it starts; a share too short for a first row skips the suite; a
    suite past its deadline starts no new row and, with none measured, writes nothing (it had
    written empty tables over the results of earlier runs)."""
    from benchmarks import bench_overhead, common, suites

    deadlines = {}

    def fake_call(cmd, cwd, env):
        deadlines[cmd[cmd.index("--suite") + 1]] = float(env[common.DEADLINE_VARIABLE])
        return 0

    monkeypatch.setattr(suites.subprocess, "call", fake_call)
    start = __import__("time").time()
    assert suites.cli(lambda argv: 0, ["--suite", "speed,decode,overhead", "--budget-s", "650"]) == 0
    weights = [suites.WEIGHTS[name] for name in ("speed", "decode", "overhead")]
    assert deadlines["speed"] - start == pytest.approx(650 * weights[0] / sum(weights), abs=5)
    # (the suites are not run here, so each later one shares out nearly the whole budget again)
    assert deadlines["overhead"] - start == pytest.approx(650, abs=5)

    deadlines.clear()
    assert suites.cli(lambda argv: 0, ["--suite", "decode,overhead", "--budget-s", str(suites.MIN_SUITE_S - 1)]) == 0
    assert deadlines == {}

    monkeypatch.setenv(common.DEADLINE_VARIABLE, str(start - 1))
    monkeypatch.setattr(common, "_said_out_of_time", False)
    assert common.out_of_time()
    earlier = tmp_path / "overhead-small.csv"
    earlier.write_text("an earlier run's rows\n")
    assert bench_overhead.main(["--out-dir", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [earlier.name] and earlier.read_text() == "an earlier run's rows\n"


def test_out_dir_goes_to_every_suite(monkeypatch, tmp_path):
    """--out-dir with several suites reaches each of them, the speed suite included (which had
    refused it, while the others wrote into benchmarks/results/)."""
    from benchmarks import suites

    commands = []
    monkeypatch.setattr(suites.subprocess, "call", lambda cmd, cwd, env: commands.append(cmd) or 0)
    assert suites.cli(lambda argv: 0, ["--suite", "speed,memory,overhead", "--quick", "--out-dir", str(tmp_path)]) == 0
    assert len(commands) == 3
    for cmd in commands:
        assert cmd[cmd.index("--out-dir") + 1] == str(tmp_path)
    assert bench.parse_args(["--out-dir", str(tmp_path)]).out_dir == tmp_path


def test_the_goals_configurations_are_measured_first():
    """A sweep cut short by its time budget still has the rows the GPU goals read."""
    order = bench.goals_first(bench.cuda_configs(quick=False))
    goal_shapes = {(D, L) for *_, D, L, _, _ in bench.GPU_GOALS}
    firsts = [(c.D, c.L) in goal_shapes for c in order]
    assert firsts == sorted(firsts, reverse=True) and sum(firsts) == 2 * len(goal_shapes)  # causal and not
    assert sorted(map(repr, order)) == sorted(map(repr, bench.cuda_configs(quick=False)))


@pytest.mark.parametrize("model, family, expected", [
    ("AMD EPYC", "26", "family26"),                               # a VM's generic name: the family tells
    ("AMD EPYC 9654 96-Core Processor", "25", None),              # a model number says enough
    ("Intel(R) Xeon(R) Processor @ 2.80GHz", "6", None),          # the clock is a number, and stays as it was
])
def test_a_generic_cpu_name_gets_its_family_in_the_results_folder(monkeypatch, model, family, expected):
    fields = {"model name": model, "cpu family": family}
    monkeypatch.setattr(bench, "_cpuinfo_field", fields.get)
    assert bench.cpu_generation() == expected
    slug = bench.device_slug(on_cuda=False)
    assert (f"-{expected}-" in slug) if expected else ("family" not in slug)
    assert slug.endswith(bench.cpu_kernels_tag())


def test_interleaved_cpu_timing_varies_which_provider_follows_which():
    """A provider that runs right after a slow, allocating one runs slower: over the rounds each
    provider must follow each other one, not mostly the same one (a rotated fixed order put the
    cyclic successor of the slowest after it in every round but one)."""
    from benchmarks import common

    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    common.time_ms_each(steps, on_cuda=False, cpu_target_s=0.0, cpu_min_reps=200, cpu_max_reps=200)
    timed = calls[2 * len(steps):]  # after two warm-up calls each
    assert len(timed) == 200 * len(steps)
    after_d = [timed[i + 1] for i in range(len(timed) - 1) if timed[i] == "d" and timed[i + 1] != "d"]
    shares = {name: after_d.count(name) / len(after_d) for name in "abc"}
    assert all(0.2 < share < 0.5 for share in shares.values()), shares


def test_cpu_results_name_the_instruction_sets_of_both_kernels(monkeypatch):
    """A CPU run records which instruction set its peers' (torch's) kernels used as well as ours:
    ATEN_CPU_CAPABILITY and FUSED_ATTN_CPU_ISA cap them separately, and a ratio means little
    without both."""
    monkeypatch.setattr(bench, "torch_cpu_capability", lambda: "AVX2")
    device_line = bench.environment_lines(on_cuda=False)[0]
    assert f"cpu kernels: {bench.cpu_kernels_tag()}" in device_line and "torch's: AVX2" in device_line
    monkeypatch.undo()
    assert bench.torch_cpu_capability() == torch.backends.cpu.get_cpu_capability()


def test_the_masked_suite_takes_another_window_and_names_its_file(tmp_path):
    """--window sets the window case's left bound (a model's window, next to the default 256) and
    the results file says so; the band SDPA gets is the same, so both agree."""
    from benchmarks import bench_masked

    assert bench_masked.main(["--quick", "--cases", "plain,window", "--window", "40", "--seqlen", "128",
                              "--out-dir", str(tmp_path), "--no-plot"]) == 0
    (table,) = tmp_path.glob("masked-L128-W40-quick.md")
    rows = [line for line in table.read_text().splitlines() if line.startswith("| window(40,0) | fused_attn")]
    assert rows and float(rows[0].split("|")[9]) < 1e-4  # the forward's max|diff| vs SDPA, fp32
    with pytest.raises(SystemExit):
        bench_masked.main(["--quick", "--window", "-1", "--out-dir", str(tmp_path)])
