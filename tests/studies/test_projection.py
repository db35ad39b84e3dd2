"""Projection without a sweep (scaling_sweep project): hand values on the Summit profile, labelled output."""
import pytest

from tsm_dist.studies.scaling.sweep import main
from tsm_dist.studies.scaling.machines import load_machine
from tsm_dist.studies.scaling.projection import parse_step_times, project_rows


def test_rows_match_the_hand_computed_summit_projection():
    # 25e6 fp32 parameters = 1e8 gradient bytes; step(1) = 0.5 s on 6 V100; see test_studies_costmodel (0.5353115 s
    # at 256 nodes), plus the per-step metrics allreduce as a tree: 2*log2(1536)->11*10 us - 2*3*5 us = 1.9e-4 s
    rows = project_rows(load_machine("summit"), {"m": 0.5}, [1, 256], per_gpu_batch=8, num_frames={"m": 8},
                        params={"m": 25_000_000}, dataset_size=1_000_000, epochs=10)
    one, big = rows
    assert one.projected_scalability == pytest.approx(1.0) and one.projected_clips_per_sec == pytest.approx(96.0)
    assert big.projected_scalability == pytest.approx(0.5 / 0.5355015, rel=1e-6)
    assert big.global_batch == 256 * 6 * 8 and big.frames_per_batch == 8 * big.global_batch
    assert big.epoch_time_s == pytest.approx(1_000_000 / (big.global_batch / 0.5355015), rel=1e-6)
    assert big.status == "projected" and big.clips_per_sec != big.clips_per_sec  # nothing measured
    half = project_rows(load_machine("summit"), {"m": 0.5}, [256], per_gpu_batch=8, num_frames={"m": 8},
                        params={"m": 25_000_000}, fp16_compression=True)[0]
    assert half.projected_scalability > big.projected_scalability
    # a sweep's calibration term (what its multi-node run took beyond the model) is added beyond one node
    calibrated = project_rows(load_machine("summit"), {"m": 0.5}, [1, 256], per_gpu_batch=8, num_frames={"m": 8},
                              params={"m": 25_000_000}, overhead_s=0.02)
    assert calibrated[0].projected_scalability == pytest.approx(1.0)
    assert calibrated[1].projected_scalability == pytest.approx(0.5 / (0.5355015 + 0.02), rel=1e-6)


def test_step_times_per_model():
    assert parse_step_times("0.7", ["a", "b"]) == {"a": 0.7, "b": 0.7}
    assert parse_step_times("a=0.5,b=1", ["a", "b"]) == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError, match=r"\['b'\]"):
        parse_step_times("a=0.5", ["a", "b"])
    with pytest.raises(ValueError, match="> 0"):
        parse_step_times("0", ["a"])


def test_cli_prints_a_labelled_projection_and_plots(tmp_path, capsys):
    assert main(["project", "--machine", "summit", "--models", "tsm8f_r50,i3d3x3x3_r50", "--step-time",
                 "tsm8f_r50=0.36,i3d3x3x3_r50=0.58", "--nodes", "1,8,256", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# PROJECTION (cost model, nothing measured): summit")
    assert "| tsm8f_r50 | 256 | 1536 | 12,288 | 98,304 |" in text
    assert "| i3d3x3x3_r50 | 8 | 48 | 384 | 6,144 |" in text
    assert (tmp_path / "projection_scalability_vs_nodes.png").stat().st_size > 10_000
