"""bench/runtime.py on a test-size shape: every runtime is timed and reported, and --profile names the int path's ops."""

import re

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["--shapes", "test", "--batch", "1", "--prompt", "32", "--new-tokens", "2", "--repeats", "1"]


def test_reports_every_runtime_with_its_ratios(load_bench, capsys):
    load_bench("runtime").main(ARGS)
    out = capsys.readouterr().out
    for runtime in ("fp32", "bf16", "dequant", "int8", "packed"):
        assert re.search(rf"^\| {runtime} \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out, re.M), runtime
    ratios = re.search(r"^test int8: prefill_over_bf16=([\d.]+) .* weight_bytes_over_fp16=([\d.]+)$", out, re.M)
    assert ratios and float(ratios[1]) > 0
    assert 0.45 < float(ratios[2]) < 0.6  # int8 codes plus fp32 scales and row sums, against fp16


def test_profile_lists_op_shares(load_bench, capsys):
    load_bench("runtime").main([*ARGS, "--profile", "int8"])
    shares = [float(m) for m in re.findall(r"^\s*([\d.]+)%  \S+", capsys.readouterr().out, re.M)]
    assert len(shares) == 12 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.5


def test_profile_of_the_int_runtime_holds_integer_matmuls(load_bench):
    # at the test shape the elementwise passes can outweigh the matmuls, so look at every op, not the top 12
    bench = load_bench("runtime")
    args = bench.parse_args(ARGS)
    args.device = "cpu"
    models = bench.build_runtimes("test", 2, "cpu")
    lines = bench.profile_prefill(models["int8"], args, 256, top=None)
    assert any("aten::_int_mm" in line for line in lines)
    assert not any("aten::_int_mm" in line for line in bench.profile_prefill(models["bf16"], args, 256, top=None))
