"""benchmarks/gpu_acceptance.py --device cpu: every check runs (or says why it is device-only) and passes,
so the script a GPU session will run is known to work up to the device itself."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import PYTHON, REPO, run_bounded

CHECKS = ["stack", "dali_decode_vp9", "dali_decode_h264", "shift_gradients_amp", "shift_overhead",
          "table10_throughput", "amp_channels_last", "train_synthetic_dali", "engine_step_channels_last",
          "horovod_allreduce_hooks", "optimizer_state_broadcast", "horovod_two_ranks_gloo"]


def test_gpu_acceptance_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "acceptance"
    result = run_bounded([PYTHON, str(REPO / "benchmarks" / "gpu_acceptance.py"), "--device", "cpu", "--out", str(out)],
                         timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    report = json.loads((out / "acceptance.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == CHECKS
    for name, check in checks.items():
        assert set(check) >= {"name", "ok", "skipped", "figures", "error", "seconds"}, name
    assert checks["dali_decode_h264"]["ok"] is None and "NVDEC" in checks["dali_decode_h264"]["skipped"]
    assert all(c["ok"] is True and c["error"] is None for n, c in checks.items() if n != "dali_decode_h264")
    decode = checks["dali_decode_vp9"]["figures"]
    assert decode["recovered"] == decode["requested"] and decode["mean_abs_diff_vs_pyav"] < decode["bound"]
    assert checks["train_synthetic_dali"]["figures"]["memory_format"] == "channels_last"
    assert "skipped" in checks["shift_gradients_amp"]["figures"]["float16"]  # fp16 autocast: device only
    hooks = checks["horovod_allreduce_hooks"]["figures"]  # a real allreduce per gradient at size 1
    assert hooks["allreduces_launched_by_hooks"] == hooks["parameters"] > 0
    assert checks["optimizer_state_broadcast"]["figures"]["bit_equal"] is True
    two = checks["horovod_two_ranks_gloo"]["figures"]  # horovodrun --gloo, fp16 compressor over the views
    assert two["ranks"] == 2 and two["ranks_hold_equal_gradients"] is True
    assert two["allreduces_launched_by_hooks"] == two["parameters"] > 0 and two["worst_grad_rel_err_vs_local_mean"] < 1e-2
    summary = (out / "acceptance.md").read_text()
    assert summary.count("| ok |") == len(CHECKS) - 1 and "| skipped |" in summary
