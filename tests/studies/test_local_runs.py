"""End to end on this machine: a local scaling sweep on 1 and 2 ranks (both engines, a simulated 4-"node"
point) and the I/O study with both loaders, each producing its table and plots."""
import csv
import json
import re

import pytest
from conftest import PYTHON, REPO, launcher_env, run_bounded

pytestmark = pytest.mark.multirank

TINY = ["--set", "model.depth=18", "--set", "model.width=8", "--set", "data.crop_size=32"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_local_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    result = run_bounded([PYTHON, "-m", "tsm_dist.scaling_sweep", "--scheduler", "local", "--config",
                          "configs/synthetic_tsm.yaml", "--nodes", "1,2", "--simulate-nodes", "4",
                          "--engines", "horovod,torch", "--per-gpu-batch", "2", "--steps", "2", "--warmup-steps", "1",
                          "--set", "data.backend=random", "--set", "data.num_samples=64", *TINY,
                          "--timeout", "150", "--out", str(out)],
                         timeout=290, env=launcher_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["engine"], int(r["nodes"]), r["simulated"]) for r in rows) == [
        ("horovod", 1, "False"), ("horovod", 2, "False"), ("horovod", 4, "True"),
        ("torch", 1, "False"), ("torch", 2, "False"), ("torch", 4, "True")]
    for r in rows:
        assert r["status"] == "completed" and int(r["timed_steps"]) == 2
        assert float(r["clips_per_sec"]) > 0 and float(r["projected_clips_per_sec"]) > 0
        assert int(r["global_batch"]) == 2 * int(r["nodes"])
        assert int(r["frames_per_batch"]) == 8 * int(r["global_batch"])
        if r["simulated"] == "True":
            assert (r["run_nodes"], r["accumulate"], r["scalability"], r["time_basis"]) == ("2", "2", "", "projected")
        else:
            assert float(r["scalability"]) > 0 and r["time_basis"] == "measured"
    # the projection used the allreduce measured on the 2-rank allocation, through mpi4py and each engine
    for engine in ("horovod", "torch"):
        run = out / "runs" / f"{engine}_tsm8f_r50_n0002"
        for method in ("mpi4py", "engine"):
            bench = json.loads((run / f"allreduce_{method}.json").read_text())
            assert bench["world_size"] == 2 and len(bench["sizes_bytes"]) >= 2
            params = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["params"]
            assert bench["sizes_bytes"][-1] == params * 4
    md = (out / "results.md").read_text()
    assert "| horovod | tsm8f_r50 | 4* | 4* | 8 | 64 |" in md and "| torch | tsm8f_r50 | 2 | 2 |" in md
    assert "microbenchmark, 2 ranks on 2 node(s)" in md
    for name in ("speed_vs_gpus.png", "scalability_vs_nodes.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_io_study_end_to_end(tmp_path):
    from tsm_dist.data.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic(str(data), videos_per_class=2, frames=16, size=32)
    out = tmp_path / "io"
    result = run_bounded([PYTHON, "-m", "tsm_dist.io_study", "--config", "configs/synthetic_tsm.yaml",
                          "--loaders", "dali,pyav", "--per-gpu-batch", "2", "--steps", "2", "--warmup-steps", "1",
                          "--set", f"data.root={data}", *TINY, "--packed", "auto", "--io-entries", "100",
                          "--timeout", "120", "--out", str(out)],
                         timeout=300, env=launcher_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    with open(out / "io_study.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["model"], r["loader"], r["layout"], r["status"]) for r in rows] == [
        ("tsm8f_r50", loader, layout, "completed") for loader in ("dali", "pyav") for layout in ("list", "packed")]
    config = (out / "jobs" / "tsm8f_r50_dali_packed_thread" / "config.yaml").read_text()
    assert f"train_list: {out / 'packed'}" in config and (out / "packed" / "pack.json").exists()
    for r in rows:
        assert float(r["data_time_s"]) >= 0 and float(r["compute_time_s"]) > 0
        assert int(r["input_values_per_clip"]) == 8 * 3 * 32 * 32
        assert float(r["compute_per_io"]) == pytest.approx(float(r["macs_per_clip"]) / (8 * 3 * 32 * 32))
    md = (out / "io_study.md").read_text()
    assert "| tsm8f_r50 | dali | list | thread | 8 | 8x32² |" in md
    # the loader I/O table: the 4 train videos repeated to 100 entries; list: 100 opens and probes, packed:
    # its 1 shard opened, nothing probed
    row = r"\| {} \| dali \| 100 \| 1 \| [0-9.]+ \| [0-9.]+ \| {} \| [0-9.]+ \| {} \|"
    assert re.search(row.format("list", 100, 100), md) and re.search(row.format("packed", 1, 0), md)
    assert (out / "io_study.png").read_bytes()[:8] == PNG


def test_io_study_feed_variants_dry_run(tmp_path):
    """--feed thread,inline runs each configuration with data.feed_thread true and false."""
    result = run_bounded([PYTHON, "-m", "tsm_dist.io_study", "--config", "configs/synthetic_tsm.yaml",
                          "--loaders", "pyav", "--feed", "thread,inline", "--dry-run", "--out", str(tmp_path)],
                         timeout=60, env=launcher_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    jobs = tmp_path / "jobs"
    assert "feed_thread: true" in (jobs / "tsm8f_r50_pyav" / "config.yaml").read_text()
    assert "feed_thread: false" in (jobs / "tsm8f_r50_pyav_list_inline" / "config.yaml").read_text()
