"""collect: metrics.jsonl files written by the trainer's writer (tsm_dist.runlog.records) -> CSV, Markdown, PNGs."""
import csv
import json

import pytest

from tsm_dist.runlog import records
from tsm_dist.runlog.records import MetricsError, MetricsLog
from tsm_dist.studies.scaling.collect import collect, format_duration, summarize_run
from tsm_dist.studies.scaling.runs import JobSpec, SweepPlan

GPUS_PER_NODE, PER_GPU, WARMUP, STEPS, PARAMS = 2, 4, 2, 3, 1_000_000

PROFILE = """name: testbox
scheduler: local
gpus_per_node: 2
gpu: cpu
max_nodes: 4
intra_node: {name: shm, latency_us: 2, bandwidth_gb_per_s: 5}
inter_node: {name: net, latency_us: 100, bandwidth_gb_per_s: 0.1}
"""


def write_metrics(path, *, engine, model, world, accumulate, step_time, status="completed", frames=8):
    """A run's metrics.jsonl as the trainer writes it (through tsm_dist.runlog.records)."""
    batch = PER_GPU * world * accumulate
    log = MetricsLog(path)
    log.write(records.header_record(
        time=0.0, config={"engine": {"fp16_compression": False}}, git_commit=None, engine=engine, world_size=world,
        local_size=GPUS_PER_NODE, model=model, num_frames=frames, per_gpu_batch=PER_GPU, accumulate=accumulate,
        global_batch=batch, params=PARAMS, versions={}, hardware={}))
    for step in range(WARMUP + STEPS):
        t = 5.0 if step < WARMUP else step_time  # slow warm-up steps must not be counted
        log.write(records.step_record(epoch=0, step=step, loss=1.0, lr=0.1, clips_per_step=PER_GPU * accumulate,
                                      world_size=world, data_time=0.01, compute_time=t * 0.8, sync_time=t * 0.1,
                                      step_time=t))
    log.write(records.end_record(status=status, step=WARMUP + STEPS, epoch=0))
    log.close()


def make_sweep(tmp_path, engines=("horovod",)):
    plan = SweepPlan(scheduler="local", machine="testbox", gpus_per_node=GPUS_PER_NODE, per_gpu_batch=PER_GPU,
                     steps=STEPS, warmup_steps=WARMUP, dataset_size=1000, epochs=10, base_config="c.yaml")
    step_times = {1: 0.5, 2: 0.5, 4: 0.625, 8: 1.1}
    for engine in engines:
        for nodes, run_nodes in ((1, 1), (2, 2), (4, 4), (8, 4)):
            tag = f"{engine}_m_n{nodes}"
            job = JobSpec(tag=tag, engine=engine, model="m", nodes=nodes, run_nodes=run_nodes,
                          accumulate=nodes // run_nodes, workdir=f"runs/{tag}", config=f"jobs/{tag}/config.yaml")
            plan.jobs.append(job)
            write_metrics(tmp_path / job.workdir / "metrics.jsonl", engine=engine, model="m",
                          world=run_nodes * GPUS_PER_NODE, accumulate=job.accumulate,
                          step_time=step_times[nodes])
        bench = {"method": engine, "world_size": 8, "nodes": 4, "dtype": "float32", "sizes_bytes": [4, 8],
                 "times_s": [1, 2], "alpha_s": 1e-5, "bandwidth_bytes_per_s": 1e9, "fit_error": ""}
        (tmp_path / f"runs/{engine}_m_n4/allreduce_engine.json").write_text(json.dumps(bench))
    plan.save(tmp_path)
    profile = tmp_path / "testbox.yaml"
    profile.write_text(PROFILE)
    return plan, profile


def test_collect_hand_values(tmp_path):
    _, profile = make_sweep(tmp_path)
    outputs = collect(tmp_path, str(profile))
    rows = {r.nodes: r for r in outputs.rows}
    assert rows[1].clips_per_sec == pytest.approx(8 / 0.5)
    assert rows[2].scalability == pytest.approx(1.0)
    assert rows[4].clips_per_sec == pytest.approx(32 / 0.625)
    assert rows[4].ideal_clips_per_sec == pytest.approx(64.0)
    assert rows[4].scalability == pytest.approx(0.8)
    assert rows[4].frames_per_batch == 32 * 8
    # projection, by hand: grad 4e6 B; intra (2 GPUs, 2 us, 5 GB/s): 2*2e-6 + 4e6/5e9 = 8.04e-4 s, plus the
    # per-step metrics allreduce (tree: 2*log2(2)*2e-6 = 4e-6 s) = 8.08e-4 s; inter from the 4-node engine
    # benchmark (8 ranks, 10 us, 1 GB/s): 2*7*1e-5 + 2*7/8*4e6/1e9 = 7.14e-3 s, plus 2*3*1e-5 = 7.2e-3 s
    assert rows[4].projected_scalability == pytest.approx(0.5 / (0.5 - 8.08e-4 + 7.2e-3), rel=1e-9)
    assert "engine allreduce microbenchmark" not in rows[4].projection_links  # method is named 'horovod'
    assert "horovod allreduce microbenchmark, 8 ranks on 4 node(s)" in rows[4].projection_links
    # simulated 8 nodes: batch 64, projected at 16 ranks: 2*15*1e-5 + 2*15/16*4e-3 + 2*4*1e-5 = 7.88e-3 s
    sim = rows[8]
    assert sim.simulated and sim.run_nodes == 4 and sim.accumulate == 2 and sim.global_batch == 64
    assert sim.scalability != sim.scalability  # NaN: not measured at 8 nodes
    assert sim.clips_per_sec == pytest.approx(64 / 1.1)  # what the 4-node allocation did with accumulation
    projected = 64 / (0.5 - 8.08e-4 + 7.88e-3)
    assert sim.projected_clips_per_sec == pytest.approx(projected, rel=1e-9)
    assert sim.time_basis == "projected"
    assert sim.epoch_time_s == pytest.approx(1000 / projected)
    assert rows[4].time_basis == "measured" and rows[4].train_time_s == pytest.approx(10 * 1000 / 51.2)
    # model vs measurement side by side: projected - measured, in points of scalability
    model_4 = 0.5 - 8.08e-4 + 7.2e-3
    assert rows[4].projection_error_points == pytest.approx(100 * (0.5 / model_4 - 0.8), rel=1e-9)
    # calibrated at the widest real run (4 nodes): what it took beyond the model, carried to 8*
    overhead = 0.625 - model_4
    assert rows[4].unmodelled_s == pytest.approx(overhead, rel=1e-9)
    assert rows[4].calibrated_scalability == pytest.approx(0.8)
    assert sim.calibrated_clips_per_sec == pytest.approx(64 / (0.5 - 8.08e-4 + 7.88e-3 + overhead), rel=1e-9)
    assert rows[1].calibrated_scalability == pytest.approx(1.0)

    with open(outputs.csv) as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["nodes"]) for r in table] == [1, 2, 4, 8]
    assert float(table[2]["scalability"]) == pytest.approx(0.8)
    assert table[3]["simulated"] == "True" and table[3]["scalability"] == ""

    md = outputs.markdown.read_text()
    assert "| horovod | m | 8* | 16* | 64 | 512 |" in md
    assert "| horovod | m | 4 | 8 | 32 | 256 | 51.2 | 64.0 | 80.0% |" in md
    assert f"| {100 * 0.5 / model_4:.1f}% | {100 * (0.5 / model_4 - 0.8):+.1f} pts | 80.0% |" in md
    assert f"horovod/m: {overhead * 1e3:+.1f} ms" in md
    assert "**Projection** (cost model, not a measurement)" in md
    assert "Simulated" in md and "horovod/m 8* on 4 nodes x 2 accumulation" in md
    for png in (outputs.speed_png, outputs.scalability_png):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_both_engines_in_one_table_and_missing_runs_reported(tmp_path):
    plan, profile = make_sweep(tmp_path, engines=("horovod", "torch"))
    (tmp_path / "runs/torch_m_n2/metrics.jsonl").unlink()
    outputs = collect(tmp_path, str(profile))
    md = outputs.markdown.read_text()
    assert "| horovod | m | 2 |" in md and "| torch | m | 4 |" in md
    missing = [r for r in outputs.rows if r.engine == "torch" and r.nodes == 2]
    assert missing[0].status.startswith("no metrics") and missing[0].timed_steps == 0
    assert md.count("| no metrics (planned) |") == 1  # the Status column
    # rows of one model and node count sit together, engines side by side
    assert [(r.nodes, r.engine) for r in outputs.rows][:2] == [(1, "horovod"), (1, "torch")]


def test_metrics_errors_name_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, engine="horovod", model="m", world=2, accumulate=1, step_time=0.5)
    assert summarize_run(path, WARMUP).step_time_s == pytest.approx(0.5)
    with pytest.raises(MetricsError, match="none after the 9 warm-up"):
        summarize_run(path, 9)
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(MetricsError, match=rf"{path}:{WARMUP + STEPS + 3}: not valid JSON"):
        summarize_run(path, WARMUP)


def test_a_bad_run_is_reported_in_its_row_and_the_rest_is_tabulated(tmp_path):
    plan, profile = make_sweep(tmp_path)
    write_metrics(tmp_path / "runs/horovod_m_n2/metrics.jsonl", engine="horovod", model="m", world=2,
                  accumulate=1, step_time=0.5)  # 1 node's worth of ranks in the 2-node run
    (tmp_path / "runs/horovod_m_n4/allreduce_engine.json").write_text("{}")
    outputs = collect(tmp_path, str(profile))
    rows = {r.nodes: r for r in outputs.rows}
    assert "global batch 8 in metrics.jsonl, but the plan expects 16" in rows[2].status
    assert rows[2].timed_steps == 0 and rows[4].clips_per_sec == pytest.approx(51.2)
    assert "allreduce_engine.json: allreduce benchmark result lacks key 'world_size'" in outputs.markdown.read_text()
    # which links the projection used, and why: the only benchmark file was unusable
    assert ("inter: fallback to the machine profile (profile testbox: net, nominal) because runs/horovod_m_n4/"
            "allreduce_engine.json: ") in rows[4].projection_links


@pytest.mark.parametrize("seconds, text", [(49 * 3600 + 55 * 60, "49h 55m"), (55 * 60 + 56, "55m 56s"),
                                           (14 * 60 + 13.4, "14m 13s"), (42, "42s"), (float("nan"), "-")])
def test_durations_like_table_12(seconds, text):
    assert format_duration(seconds) == text


def test_a_terminated_1_node_run_is_marked_as_the_ideal_baseline(tmp_path):
    make_sweep(tmp_path)
    profile = tmp_path / "testbox.yaml"
    write_metrics(tmp_path / "runs/horovod_m_n1/metrics.jsonl", engine="horovod", model="m", world=2,
                  accumulate=1, step_time=0.5, status="terminated")
    outputs = collect(tmp_path, str(profile))
    rows = {r.nodes: r for r in outputs.rows}
    assert rows[4].ideal_clips_per_sec == pytest.approx(64.0)  # still the baseline, but marked as such
    assert rows[4].ideal_from == f"runs/horovod_m_n1, which ended terminated after {STEPS} timed step(s)"
    md = outputs.markdown.read_text()
    assert "| horovod | m | 4 | 8 | 32 | 256 | 51.2 | 64.0† | 80.0% |" in md
    assert (f"† Ideal from a 1-node run that did not complete: horovod/m: runs/horovod_m_n1, which ended "
            f"terminated after {STEPS} timed step(s)") in md
    make_sweep(tmp_path)  # completed again: no mark
    assert "†" not in collect(tmp_path, str(profile)).markdown.read_text()


def test_a_cpu_sweep_is_plotted_and_linked_as_cpu_ranks(tmp_path, monkeypatch):
    import tsm_dist.studies.scaling.collect as collect_module

    plan, profile = make_sweep(tmp_path)
    labels = []
    monkeypatch.setattr(collect_module, "_save", lambda fig, ax, path, xlabel, ylabel, title: labels.append(xlabel))
    collect(tmp_path, str(profile))
    assert labels[0] == "Number of GPUs"
    plan.gpus_per_node, plan.ranks_per_node = 0, GPUS_PER_NODE
    plan.save(tmp_path)
    gpu_profile = tmp_path / "gpubox.yaml"
    gpu_profile.write_text(PROFILE.replace("testbox", "gpubox").replace("shm", "NVLink 1.0"))
    outputs = collect(tmp_path, str(gpu_profile))
    assert labels[2] == "Number of CPU ranks" and "| #Rank |" in outputs.markdown.read_text()
    # the 2-node engine benchmark is missing: the intra link is the profile's, and says it is a GPU's
    rows = {r.nodes: r for r in outputs.rows}
    assert "profile gpubox: NVLink 1.0, a GPU link: this sweep ran CPU ranks, nominal) because" in \
        rows[2].projection_links


def test_a_run_whose_ranks_changed_is_no_measurement_and_its_row_says_so(tmp_path):
    plan, profile = make_sweep(tmp_path)
    path = tmp_path / "runs/horovod_m_n2/metrics.jsonl"
    log = MetricsLog(path)  # an elastic run lost a rank after its last timed step (appended)
    log.write(records.membership_record(old_world=4, new_world=3, cause="rank lost",
                                        rolled_back_to={"step": WARMUP + STEPS, "epoch": 0, "batch_in_epoch": 0},
                                        steps_lost=0, continues_at={"step": WARMUP + STEPS, "epoch": 0,
                                                                    "batch_in_epoch": 1}))
    log.close()
    outputs = collect(tmp_path, str(profile))
    rows = {r.nodes: r for r in outputs.rows}
    assert "the run's ranks changed (4 -> 3): its steps are not a measurement at one world size" in rows[2].status
    assert rows[2].timed_steps == 0 and rows[4].timed_steps == STEPS
