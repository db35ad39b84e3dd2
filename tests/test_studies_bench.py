"""Allreduce microbenchmark helpers (the 2-rank run itself is part of the local sweep test)."""
import json

import pytest

from tsm_dist import records
from tsm_dist.records import MetricsLog
from tsm_dist.studies.allreduce_bench import gradient_bytes_from_metrics, message_sizes, parse_args, result_record
from tsm_dist.studies.costmodel import LinkCost, ring_allreduce_time


def test_message_sizes_are_geometric_whole_floats_and_end_at_the_gradient_size():
    sizes = message_sizes(40_000_000, 4096, 8)
    assert sizes[0] == 4096 and sizes[-1] == 40_000_000 and len(sizes) == 8
    assert all(s % 4 == 0 for s in sizes) and sizes == sorted(set(sizes))
    ratios = [b / a for a, b in zip(sizes, sizes[1:])]
    assert max(ratios) / min(ratios) < 1.01
    assert message_sizes(10, 4096, 8) == [8]  # below the minimum: the one message there is
    assert message_sizes(4_000_002, 4096, 2) == [4096, 4_000_000]
    with pytest.raises(ValueError):
        message_sizes(3)


def test_gradient_size_from_the_run_header(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write(records.step_record(epoch=0, step=1, loss=1.0, lr=0.1))
    with pytest.raises(ValueError, match="no header record; cannot size"):
        gradient_bytes_from_metrics(path)
    for params in (1000, 2000):  # a resumed run appends a header; the last one counts
        log.write(records.header_record(config={}, engine="horovod", world_size=2, local_size=2, model="m",
                                        num_frames=8, per_gpu_batch=1, accumulate=1, global_batch=2, params=params))
        log.write(records.step_record(epoch=0, step=1, loss=1.0, lr=0.1))
    log.close()
    assert gradient_bytes_from_metrics(path) == 8000


def test_result_record_fits_or_says_why_not():
    sizes = [4096, 65536, 1 << 20]
    link = LinkCost(20e-6, 3e9)
    record = result_record("mpi4py", 4, 2, sizes, [ring_allreduce_time(4, n, link) for n in sizes])
    assert record["alpha_s"] == pytest.approx(20e-6) and record["bandwidth_bytes_per_s"] == pytest.approx(3e9)
    json.dumps(record)
    single = result_record("mpi4py", 1, 1, sizes, [1e-6] * 3)
    assert single["alpha_s"] is None and "participants" in single["fit_error"]


def test_cli_checks_methods():
    assert parse_args(["--max-bytes", "8", "--out", "x"]).methods == ["mpi4py", "engine"]
    with pytest.raises(SystemExit):
        parse_args(["--max-bytes", "8", "--out", "x", "--method", "nccl"])
    with pytest.raises(SystemExit):
        parse_args(["--out", "x"])  # a message size is required
