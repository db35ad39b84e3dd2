"""Allreduce microbenchmark: time allreduce over message sizes up to a model's gradient size.

Started once per rank (mpirun, horovodrun, jsrun, srun) on the sweep's own allocation, through mpi4py and
through the training engine, so the projection uses the latency and bandwidth this allocation really has.
Rank 0 writes one JSON file per method with the raw timings and the fitted ring-model α and B:

    python -m tsm_dist.studies.scaling.allreduce_bench --method mpi4py,engine --engine horovod \
        --max-bytes-from RUN/metrics.jsonl --nodes 2 --out RUN
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from tsm_dist.commands.arguments import choice_list
from tsm_dist.ranks.layout import launcher_layout
from tsm_dist.runlog.records import MetricsError, read_last_run
from tsm_dist.studies.scaling.costmodel import LinkCost, fit_ring_link, gradient_bytes, ring_allreduce_time

if TYPE_CHECKING:
    from tsm_dist.config import EngineConfig
    from tsm_dist.distributed.engine import Engine

FLOAT_BYTES = 4
METHODS = ("mpi4py", "engine", "engine_fp16")


def message_sizes(max_bytes: int, min_bytes: int = 4096, points: int = 8) -> list[int]:
    """Geometric sizes from ``min_bytes`` to ``max_bytes`` inclusive, whole float32 elements, no repeats."""
    if max_bytes < FLOAT_BYTES:
        raise ValueError(f"max message size must be >= {FLOAT_BYTES} bytes, got {max_bytes}")
    min_bytes = min(min_bytes, max_bytes)
    if points < 2 or min_bytes == max_bytes:
        return [max_bytes // FLOAT_BYTES * FLOAT_BYTES]
    ratio = (max_bytes / min_bytes) ** (1 / (points - 1))
    largest = max_bytes // FLOAT_BYTES * FLOAT_BYTES
    sizes = {round(min_bytes * ratio ** i / FLOAT_BYTES) * FLOAT_BYTES for i in range(points - 1)}
    return sorted(s for s in sizes | {largest} if FLOAT_BYTES <= s <= largest)


def gradient_bytes_from_metrics(path: Path) -> int:
    """Gradient size of the model a training run used: parameters from its metrics.jsonl header, fp32."""
    try:
        header = read_last_run(path).header
    except MetricsError as err:  # a ValueError
        raise MetricsError(f"{err}; cannot size the allreduce messages") from err
    return int(gradient_bytes(int(header["params"])))


def time_collective(run_once: Callable[[], None], barrier: Callable[[], None],
                    slowest: Callable[[float], float], repeats: int, warmup: int) -> float:
    """Median over ``repeats`` of the slowest rank's time for one call (all ranks start together)."""
    for _ in range(warmup):
        run_once()
    samples = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        run_once()
        samples.append(slowest(time.perf_counter() - start))
    return median(samples)


class NotOneMPIWorld(RuntimeError):
    pass


# What a process started by an MPI launcher (or by srun's PMI/PMIx plugin) finds in its environment
MPI_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS")


def no_mpi_world(env: Mapping[str, str]) -> str | None:
    """Why this process cannot join an MPI world (None: it can). Checked before MPI_Init: under
    ``srun --mpi=none`` OpenMPI's MPI_Init finds a Slurm step without PMI and aborts the whole step."""
    if any(env.get(var) for var in MPI_WORLD_VARS):
        return None
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID") is not None:
        return (f"srun started the ranks without MPI (--mpi={env.get('SLURM_MPI_TYPE', 'none')}, the Gloo "
                f"controller's launch): MPI_Init would abort the step; skipping mpi4py")
    if env.get("HOROVOD_RANK") is not None:
        return "horovodrun --gloo started the ranks: they are not one MPI world; skipping mpi4py"
    return None


def bench_mpi4py(sizes: Sequence[int], repeats: int, warmup: int) -> tuple[int, int, list[float]]:
    """(rank, world size, seconds per size) for MPI_Allreduce(SUM) of float32 buffers."""
    reason = no_mpi_world(os.environ)
    if reason:
        raise NotOneMPIWorld(reason)
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    launched = launcher_layout()[1]
    if comm.Get_size() != launched:
        raise NotOneMPIWorld(f"mpi4py sees {comm.Get_size()} rank(s) but the launcher started {launched}: the "
                             f"ranks are not one MPI world (horovodrun --gloo, srun --mpi=none); skipping mpi4py")
    times = []
    for size in sizes:
        send = np.ones(size // FLOAT_BYTES, dtype=np.float32)
        recv = np.empty_like(send)
        times.append(time_collective(lambda: comm.Allreduce(send, recv, op=MPI.SUM), comm.Barrier,
                                     lambda t: comm.allreduce(t, op=MPI.MAX), repeats, warmup))
    return comm.Get_rank(), comm.Get_size(), times


def bench_engine(engine: "Engine", sizes: Sequence[int], repeats: int, warmup: int,
                 fp16: bool = False) -> tuple[int, int, list[float]]:
    """(rank, world size, seconds per size) for the training engine's in-place allreduce of float32
    tensors; ``fp16``: as fp16 compression does it (cast to half, allreduce, cast back), same fp32 sizes."""
    import torch

    def slowest(seconds: float) -> float:
        return max(engine.allgather_object(seconds))

    def allreduce(tensor: "torch.Tensor") -> Callable[[], None]:
        def run() -> None:  # in place, as the gradient allreduce: no new 100 MB buffer per call
            if fp16:
                tensor.copy_(engine.allreduce_sum_(tensor.to(torch.float16)))
            else:
                engine.allreduce_sum_(tensor)
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
        return run

    check = torch.full((3,), float(engine.rank + 1), device=engine.device)
    expected = engine.size * (engine.size + 1) / 2
    if engine.allreduce_sum_(check.half() if fp16 else check).float().tolist() != [expected] * 3:
        raise RuntimeError(f"rank {engine.rank}: the engine's in-place allreduce did not sum over ranks")
    times = []
    for size in sizes:
        # zeros: a sum repeated in place stays finite in fp16 too
        tensor = torch.zeros(size // FLOAT_BYTES, dtype=torch.float32, device=engine.device)
        times.append(time_collective(allreduce(tensor), engine.barrier, slowest, repeats, warmup))
    return engine.rank, engine.size, times


# A fit whose own prediction for the largest message is off by more than this factor contradicts its
# data (e.g. alpha 3 ms and B 26 GB/s fitted to timings whose largest message ran at 0.44 GB/s)
FIT_TOLERANCE = 2.0
# ... as does one whose latency alone exceeds a measured time by more than this factor (the small messages'
# timings scatter around the fitted intercept: each is a median of its own, not a bound)
LATENCY_TOLERANCE = 1.5


def fit_contradiction(world_size: int, sizes: Sequence[int], times: Sequence[float], link: LinkCost) -> str:
    """Why ``link`` does not describe the timings it was fitted to ("" when it does): its latency alone
    exceeds LATENCY_TOLERANCE times the fastest measured time, or its prediction for the largest message is
    off by more than FIT_TOLERANCE (docs/studies.md states both rules with these factors)."""
    fit = f"fit rejected: alpha {link.alpha_s * 1e6:.1f} us, B {link.bandwidth_bytes_per_s / 1e9:.3f} GB/s"
    largest, measured = max(zip(sizes, times))
    latency = ring_allreduce_time(world_size, 0, link)
    fastest_size, fastest = min(zip(times, sizes), key=lambda pair: pair[0])[::-1]
    if latency > LATENCY_TOLERANCE * fastest:
        return (f"{fit}: its latency alone ({latency * 1e3:.2f} ms per allreduce) exceeds {LATENCY_TOLERANCE:g}x "
                f"the fastest measured time, {fastest * 1e3:.2f} ms of the {fastest_size:,} B message (the largest, "
                f"{largest:,} B, ran at "
                f"{largest / measured / 1e9:.3f} GB/s): the timings do not follow the ring model")
    predicted = ring_allreduce_time(world_size, largest, link)
    if not 1 / FIT_TOLERANCE <= measured / predicted <= FIT_TOLERANCE:
        return (f"{fit}: predicts {predicted * 1e3:.2f} ms for the largest message ({largest:,} B), measured "
                f"{measured * 1e3:.2f} ms ({largest / measured / 1e9:.3f} GB/s): the timings do not follow the "
                f"ring model (contention or noise)")
    return ""


def result_record(method: str, world_size: int, nodes: int, sizes: Sequence[int], times: Sequence[float]
                  ) -> dict:
    record = {"method": method, "world_size": world_size, "nodes": nodes, "dtype": "float32",
              "sizes_bytes": list(sizes), "times_s": list(times), "alpha_s": None,
              "bandwidth_bytes_per_s": None, "fit_error": ""}
    try:
        link = fit_ring_link(world_size, sizes, times, source=method)
    except ValueError as err:  # one rank, one size, or noise: keep the raw timings, say why there is no fit
        record["fit_error"] = str(err)
        return record
    record["fit_error"] = fit_contradiction(world_size, sizes, times, link)
    if record["fit_error"]:  # kept for the record, not for a projection
        record["rejected_fit"] = {"alpha_s": link.alpha_s, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s}
    else:
        record["alpha_s"] = link.alpha_s
        record["bandwidth_bytes_per_s"] = link.bandwidth_bytes_per_s
    return record


def engine_config(engine: str, config: Path | None) -> "EngineConfig":
    """The engine section of ``config`` (the defaults without one), run as ``engine``."""
    from tsm_dist.config import EngineConfig, load_config

    cfg = load_config(config).engine if config else EngineConfig()
    cfg.name = engine
    return cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tsm_dist.studies.scaling.allreduce_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", dest="methods", type=choice_list(METHODS), default=["mpi4py", "engine"],
                        help="comma list of mpi4py, engine, engine_fp16 (the engine's allreduce with fp16 "
                             "compression: cast, allreduce, cast back; default mpi4py,engine)")
    parser.add_argument("--engine", default="horovod", choices=("horovod", "torch"),
                        help="training engine for --method engine")
    parser.add_argument("--config", type=Path,
                        help="training config whose engine section (fusion, timeouts) the engine uses; "
                             "--engine still picks the engine")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--max-bytes", type=int, help="largest message in bytes")
    size.add_argument("--max-bytes-from", type=Path, metavar="METRICS_JSONL",
                      help="largest message = the gradient size of the run that wrote this metrics.jsonl")
    parser.add_argument("--min-bytes", type=int, default=4096)
    parser.add_argument("--points", type=int, default=8, help="message sizes (geometric)")
    parser.add_argument("--repeats", type=int, default=10, help="timings per size; the median is kept")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the allocation (recorded with the result)")
    parser.add_argument("--out", type=Path, required=True, help="directory for allreduce_<method>.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.points < 1:
        parser.error("--repeats and --points must be >= 1")
    return args


def _report(out: Path, method: str, name: str, record: dict, rank: int, sizes: Sequence[int]) -> None:
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"allreduce_{method}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    fitted = (f": {record['fit_error']}" if record["alpha_s"] is None else
              f": alpha {record['alpha_s'] * 1e6:.1f} us, B {record['bandwidth_bytes_per_s'] / 1e9:.3f} GB/s")
    largest = max(sizes) / record["times_s"][-1] / 1e9
    print(f"allreduce {name} on {record['world_size']} rank(s), {len(sizes)} sizes up to {max(sizes):,} B "
          f"({largest:.2f} GB/s at the largest) -> {path}{fitted}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    max_bytes = args.max_bytes if args.max_bytes is not None else gradient_bytes_from_metrics(args.max_bytes_from)
    sizes = message_sizes(max_bytes, args.min_bytes, args.points)
    # MPI starts once per process (mpi4py or Horovod, whichever comes first): with the settings the engine
    # trains with, so that both methods run on the same MPI
    from tsm_dist.ranks.cpu_policy import cpu_mpi_env

    os.environ.update(cpu_mpi_env(os.environ))
    with contextlib.ExitStack() as stack:
        engine = None
        for method in args.methods:
            if method == "mpi4py":
                try:
                    rank, world, times = bench_mpi4py(sizes, args.repeats, args.warmup)
                except NotOneMPIWorld as err:  # one line, from one rank
                    if launcher_layout()[0] == 0:
                        print(f"allreduce_bench: {err}", file=sys.stderr, flush=True)
                    continue
            else:
                if engine is None:  # one engine for both engine methods: Horovod cannot restart in a process
                    from tsm_dist.distributed.engine import started

                    engine = stack.enter_context(started(engine_config(args.engine, args.config)))
                rank, world, times = bench_engine(engine, sizes, args.repeats, args.warmup,
                                                  fp16=method == "engine_fp16")
            name = {"mpi4py": "mpi4py", "engine": args.engine}.get(method, f"{args.engine}_fp16")
            _report(args.out, method, name, result_record(name, world, args.nodes, sizes, times), rank, sizes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
