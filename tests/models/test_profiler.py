"""Full-size statistics against the paper's Tables 10/11, and the `tsm-dist profile` command."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tsm_dist.models.profiler import main, model_stats


@pytest.fixture(scope="module")
def full_size() -> dict:
    return {name: model_stats(name) for name in ("tsn8f_r50", "tsm8f_r50", "i3d3x3x3_r50", "i3d3x1x1_r50")}


def test_tsm8f_matches_table10(full_size) -> None:
    tsm = full_size["tsm8f_r50"]
    assert tsm.input_values == 8 * 3 * 224 * 224
    assert tsm.params == 24_327_632  # paper: 24.3 M (ResNet-50 with a 400-way classifier)
    assert abs(tsm.macs / 33e9 - 1) < 0.02  # paper: 33 G
    tsn = full_size["tsn8f_r50"]
    assert (tsn.macs, tsn.params) == (tsm.macs, tsm.params)  # the shift is free


def test_i3d_models_match_table10(full_size) -> None:
    tsm, i3d333, i3d311 = (full_size[n] for n in ("tsm8f_r50", "i3d3x3x3_r50", "i3d3x1x1_r50"))
    assert abs(i3d333.compute_io / 16.6e3 - 1) < 0.02  # paper: 16.6 k MACs per input value
    assert abs(i3d333.params / tsm.params - 1.9) < 0.05  # paper: 1.9x TSM8f's model size
    assert abs(i3d311.compute_io / 6.85e3 - 1) < 0.02  # paper: 6.85 k
    assert i3d333.frames == 16 and i3d311.frames == 32
    assert tsm.compute_io > 3.5 * i3d311.compute_io  # paper: 4x


def test_table11_temporal_resolution(full_size) -> None:
    assert dict(full_size["tsm8f_r50"].temporal_resolution) == {
        "input": 8, "conv1": 8, "pool1": 8, "res2": 8, "res3": 8, "res4": 8, "res5": 8, "global pool": 1}
    assert full_size["i3d3x3x3_r50"].temporal_resolution == [
        ("input", 16), ("conv1", 16), ("pool1", 8), ("res2", 8), ("res3", 4), ("res4", 2), ("res5", 1),
        ("global pool", 1)]
    assert full_size["i3d3x1x1_r50"].temporal_resolution == [
        ("input", 32), ("conv1", 16), ("pool1", 8), ("res2", 8), ("pool2", 4), ("res3", 4), ("res4", 4),
        ("res5", 4), ("global pool", 1)]


def test_profile_json_without_throughput(capsys) -> None:
    assert main(["--no-throughput", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["i3d3x3x3_r50", "i3d3x1x1_r50", "tsm8f_r50", "tsm8f_mbv2"]
    assert all(r["clips_per_s"] is None for r in rows)
    assert [r["online_cache_bytes"] for r in rows] == [None, None, 2_809_856, 108_192]


@pytest.mark.parametrize("mode", [[], ["--train"]])
def test_profile_measures_throughput_of_a_small_build(capsys, mode: list[str]) -> None:
    argv = ["--models", "tsm8f_r50,i3d3x1x1_r50", "--depth", "18", "--width", "8", "--size", "32",
            "--num-frames", "4", "--batch", "2", "--warmup", "0", "--iters", "1", "--device", "cpu", *mode]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Table 10" in out and "Table 11" in out and "pool2" in out
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["clips_per_s"] > 0 for r in rows)
    assert rows[0]["throughput_setup"]["mode"] == ("train" if mode else "inference")


def test_profile_rejects_unknown_model(capsys) -> None:
    assert main(["--models", "tsm8f_r50,c3d", "--no-throughput"]) == 2
    assert "c3d" in capsys.readouterr().err


def test_profile_runs_as_a_module() -> None:
    proc = subprocess.run([sys.executable, "-m", "tsm_dist.models.profiler", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--no-throughput" in proc.stdout


def test_online_cache_bytes_beside_resnet50() -> None:
    from tsm_dist.models.profiler import format_tables, model_stats, online_cache_bytes

    assert online_cache_bytes("tsm8f_r50") == 2_809_856  # 1/8 of all 16 block inputs at 224 (docs/models.md)
    # the official MobileNetV2 online demo's ten buffers: 27,048 float32 values
    assert online_cache_bytes("tsm8f_mbv2") == 4 * 27_048
    assert online_cache_bytes("tsn8f_r50") is None and online_cache_bytes("i3d3x1x1_r50") is None
    text = format_tables([model_stats("tsm8f_r50"), model_stats("tsm8f_mbv2")])
    assert "tsm8f_mbv2         0.30 G     " in text and "2.810 MB   0.9 MB cache" in text
