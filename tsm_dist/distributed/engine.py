"""The distributed engine: the only module that imports Horovod or torch.distributed.

Two engines behind one interface, chosen by ``engine.name`` in the config:

* ``horovod`` -- ring-allreduce through ``hvd.DistributedOptimizer`` (NCCL on GPU, Gloo or MPI on CPU).
  Gradient accumulation uses ``backward_passes_per_step``: the allreduce of a gradient starts only on
  the K-th backward pass, so K micro-batches cost exactly one allreduce.
* ``torch`` -- ``DistributedDataParallel`` (NCCL on GPU, Gloo on CPU); the first K-1 backward passes run
  under ``no_sync()``.

The train loop calls, in this order: :meth:`Engine.init`, :meth:`distribute`,
:meth:`broadcast_state`, then per step :meth:`no_sync` around each non-final backward,
:meth:`synchronize` (the step's gradients are averaged after it), and :meth:`step`.

Elastic training (``engine.elastic``, Horovod only) adds :meth:`elastic_state` and :meth:`elastic_run`:
Horovod's elastic loop around the training, with a state whose commit, restore and sync are our code's
(:mod:`tsm_dist.training.elastic` decides what a commit holds).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import time
from datetime import timedelta
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from tsm_dist.config import EngineConfig
from tsm_dist.commands.exit_codes import EXIT_CONFIG, CoordinatedError
from tsm_dist.ranks.cpu_policy import CPU_CYCLE_TIME_MS, compute_threads, cpu_mpi_env
from tsm_dist.ranks.layout import launcher_layout
from tsm_dist.distributed.gradients import DenseViewCompressor, dense_view, send_gradients_in_parameter_order


def horovod_env(cfg: EngineConfig, on_gpu: bool, env: Mapping[str, str]) -> dict[str, str]:
    """The variables Horovod reads at init, from the config (which wins over the launcher's flags, so
    that a run is described by its config alone) and, on CPU ranks only, the CPU defaults above (the
    user's own environment wins over those: :mod:`tsm_dist.ranks.cpu_policy`)."""
    knobs = {
        "HOROVOD_FUSION_THRESHOLD": str(int(cfg.fusion_threshold_mb * 1024 * 1024)),
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(cfg.stall_check_s),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(cfg.stall_shutdown_s),
    }
    if cfg.stall_check_s == 0:
        knobs["HOROVOD_STALL_CHECK_DISABLE"] = "1"
    if cfg.cycle_time_ms:
        knobs["HOROVOD_CYCLE_TIME"] = f"{cfg.cycle_time_ms:g}"
    elif not on_gpu and "HOROVOD_CYCLE_TIME" not in env and not cfg.elastic:
        # not in an elastic run: Horovod 0.28.1 segfaults in its re-init after a lost rank when the cycle time
        # and the fusion threshold are both set (docs/training.md, "Elastic training")
        knobs["HOROVOD_CYCLE_TIME"] = f"{CPU_CYCLE_TIME_MS:g}"
    if cfg.timeline:
        knobs["HOROVOD_TIMELINE"] = cfg.timeline
    knobs.update(cpu_mpi_env(env, on_gpu))
    return knobs


def shared_gpus(pinned: list[tuple[str, str, int]]) -> str:
    """One line naming the ranks that pinned the same GPU of the same node, from every rank's (node, GPU
    UUID, rank); empty when each rank has its own GPU."""
    owners: dict[tuple[str, str], list[int]] = {}
    for node, gpu, rank in pinned:
        owners.setdefault((node, gpu), []).append(rank)
    for (node, gpu), ranks in owners.items():
        if len(ranks) > 1:
            return (f"ranks {', '.join(map(str, sorted(ranks)))} share GPU {gpu} on {node}: fewer GPUs are visible "
                    f"to them than ranks run there; start one rank per GPU (the launch/ wrappers bind one each)")
    return ""


class Engine:
    """Rank layout, collectives and the distributed optimizer for one engine."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.device = torch.device("cpu")
        self._layout = (0, 1, 0, 1)
        self._hvd: Any = None
        self._dist: Any = None
        self._started_here = False
        self.settings: dict[str, str] = {}  # the communication settings this engine started with

    # ----------------------------------------------------------------------------------- setup
    def init(self) -> "Engine":
        """Start the engine (idempotent) and pin this rank to its device by local rank."""
        if self.name == "horovod":
            self._init_horovod()
        else:
            self._init_torch()
        self._pin_device()
        self._refuse_shared_gpu()
        if self.device.type != "cuda":
            torch.set_num_threads(compute_threads())
            self.settings["compute_threads"] = str(torch.get_num_threads())
        return self

    def _pin_device(self) -> None:
        """This rank's GPU by local rank. The torch engine calls it before creating a NCCL process group,
        which binds its communicators to the current device."""
        if torch.cuda.is_available():
            # A launcher may show each rank only its own GPU (srun --gpus-per-task, jsrun -g1) or its resource
            # set's (jsrun per socket): local_rank then exceeds device_count. _refuse_shared_gpu checks the result.
            index = self.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", index)

    def _refuse_shared_gpu(self) -> None:
        """Two ranks on one GPU would run (slowly, or out of memory) without a word: every rank tells the
        others which physical GPU it pinned, and all stop with one line if two share one."""
        if self.device.type != "cuda" or self.size == 1 or self.cfg.allow_shared_gpu:
            return
        uuid = str(getattr(torch.cuda.get_device_properties(self.device), "uuid", self.device))
        shared = shared_gpus(self.allgather_object((os.uname().nodename, uuid, self.rank)))
        if shared:
            raise CoordinatedError(shared, EXIT_CONFIG)

    def _init_horovod(self) -> None:
        # Horovod (and MPI, which its background thread initializes) read their knobs at init
        self.settings = horovod_env(self.cfg, torch.cuda.is_available(), os.environ)
        os.environ.update(self.settings)
        import horovod.torch as hvd

        if not hvd.is_initialized():
            hvd.init()
            self._started_here = True
        self._hvd = hvd
        self.refresh_layout()

    def _init_torch(self) -> None:
        import torch.distributed as dist

        rank, size, local_rank, local_size = launcher_layout()
        self._layout = (rank, size, local_rank, local_size)
        self._pin_device()  # before init_process_group: NCCL binds to the current device
        if size == 1:  # nothing to communicate with: no process group, no port
            return
        if not dist.is_initialized():
            if size > local_size and "MASTER_ADDR" not in os.environ:
                raise RuntimeError("engine torch on several nodes needs MASTER_ADDR (and MASTER_PORT) "
                                   "of rank 0's node; torchrun and the launch/ wrappers set them")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            bound = ({"device_id": self.device} if backend == "nccl"
                     and "device_id" in inspect.signature(dist.init_process_group).parameters else {})
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                                    timeout=timedelta(seconds=self.cfg.timeout_s), **bound)
            self._started_here = True
        self._dist = dist
        self._layout = (dist.get_rank(), dist.get_world_size(), local_rank, local_size)

    def refresh_layout(self) -> None:
        """Rank, size and local layout again, after Horovod's elastic reset (shutdown + init) renumbered the ranks."""
        hvd = self._hvd
        self._layout = (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())

    @property
    def rank(self) -> int:
        return self._layout[0]

    @property
    def size(self) -> int:
        return self._layout[1]

    @property
    def local_rank(self) -> int:
        return self._layout[2]

    @property
    def local_size(self) -> int:
        return self._layout[3]

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shutdown(self, clean: bool = True) -> None:
        """Stop the engine; ``clean=False`` after an error, when peers may never reach a barrier."""
        if not self._started_here:
            return
        if self._hvd is not None:
            self._hvd.shutdown()
        elif self._dist is not None and self._dist.is_initialized():
            # Every rank done with every collective first: Gloo aborts the process ("terminate called
            # without an active exception") if a peer tears its pairs down while work is in flight.
            if clean:
                self._dist.barrier()
            self._dist.destroy_process_group()
        self._started_here = False

    # ------------------------------------------------------------------------------ collectives
    def _collective_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        # NCCL only reduces CUDA tensors; Horovod and Gloo take CPU tensors
        if self.name == "torch" and self.device.type == "cuda":
            return tensor.to(self.device)
        return tensor

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks into a new tensor (one wait path: :meth:`allreduce_sum_`)."""
        return self.allreduce_sum_(tensor.clone())

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (what the gradient allreduce does: no new buffer per call)."""
        if self.size == 1:
            return tensor
        if self._hvd is not None:
            handle = self._hvd.allreduce_async_(tensor, op=self._hvd.Sum, name="tsm_dist.allreduce_sum_")
            self._wait_horovod([handle])
            return self._hvd.synchronize(handle)
        buf = self._collective_tensor(tensor)
        self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allreduce_sum(tensor) / self.size

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if self.size == 1:
            return obj
        if self._hvd is not None:
            return self._hvd.broadcast_object(obj, root_rank=root, name="tsm_dist.broadcast_object")
        box = [obj]
        self._dist.broadcast_object_list(box, src=root, device=self._object_device())
        return box[0]

    def allgather_object(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        if self._hvd is not None:
            return self._hvd.allgather_object(obj, name="tsm_dist.allgather_object")
        out: list[Any] = [None] * self.size
        self._dist.all_gather_object(out, obj)
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def barrier(self) -> None:
        if self.size == 1:
            return
        if self._hvd is not None:
            self._hvd.barrier()
        else:
            self._dist.barrier()

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor], root: int = 0) -> None:
        """In-place broadcast of named tensors (e.g. a state_dict) from ``root``."""
        if self.size == 1:
            return
        # Horovod refuses non-contiguous (channels-last) tensors: broadcast their contiguous views (no copy)
        if self._hvd is not None:
            self._hvd.broadcast_parameters({name: dense_view(t.data) for name, t in tensors.items()},
                                           root_rank=root)
            return
        for tensor in tensors.values():
            view = dense_view(tensor.data)
            buf = self._collective_tensor(view)
            self._dist.broadcast(buf, src=root)
            if buf is not view:
                view.copy_(buf)

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank start from rank 0's parameters, buffers and optimizer state.

        Optimizer state goes as one object only when rank 0 has any (a resumed run): Horovod's
        ``broadcast_optimizer_state`` would otherwise take an SGD step with zero gradients to create
        the state, which applies weight decay and seeds momentum with it.
        """
        self.broadcast_tensors(model.state_dict())
        if self.size == 1:
            return
        has_state = self.broadcast_object(bool(optimizer.state_dict()["state"]) if self.is_root else None)
        if has_state:
            # As bytes loaded onto this rank's own device: a pickled CUDA tensor would come back on rank
            # 0's device index, i.e. every rank of a node would allocate (and start a context) on GPU 0.
            payload = self.broadcast_object(_state_bytes(optimizer.state_dict()) if self.is_root else None)
            if not self.is_root:
                optimizer.load_state_dict(_state_from_bytes(payload, self.device))

    # ------------------------------------------------------------------- distributed optimizer
    def distribute(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   accumulate: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap for data-parallel training with ``accumulate`` backward passes per allreduce.

        Returns (module to call forward on, optimizer to step). Checkpoints keep using ``model``.
        """
        if self._hvd is not None:
            hvd = self._hvd
            compression = hvd.Compression.fp16 if self.cfg.fp16_compression else hvd.Compression.none
            # channels-last gradients reach Horovod as contiguous views of themselves (see gradients.py)
            compression = DenseViewCompressor(compression)
            optimizer = hvd.DistributedOptimizer(
                optimizer, named_parameters=model.named_parameters(), compression=compression,
                backward_passes_per_step=accumulate, op=hvd.Average,
                gradient_predivide_factor=self.cfg.gradient_predivide_factor)
            send_gradients_in_parameter_order(optimizer)
            return model, optimizer
        if self.size == 1:
            return model, optimizer
        from torch.nn.parallel import DistributedDataParallel

        # Like Horovod, each rank keeps its own BN statistics between steps; the train loop broadcasts
        # rank 0's before evaluating or saving. torch >= 2.13 names this forward_sync_buffers (its
        # init-time buffer sync is harmless: broadcast_state already made the buffers equal).
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        # On CPU ranks the gradients are views of the allreduce buckets, so the averaged bucket is not
        # copied back out into every gradient on the computing cores (measured: docs/studies.md, "Scaling
        # on CPU ranks"). GPU ranks keep DDP's default.
        ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.fusion_threshold_mb, gradient_as_bucket_view=self.device.type == "cpu",
            **no_buffer_sync)
        if self.cfg.fp16_compression or self.cfg.gradient_predivide_factor != 1.0:
            ddp.register_comm_hook(None, self._ddp_comm_hook())
        return ddp, optimizer

    def _ddp_comm_hook(self) -> Any:
        """DDP allreduce with Horovod's fp16 compression and gradient pre-division semantics."""
        dist, factor, fp16, size = self._dist, self.cfg.gradient_predivide_factor, self.cfg.fp16_compression, self.size

        def hook(state, bucket):  # unannotated: DDP rejects annotations other than its own types
            buffer = bucket.buffer()
            wire = buffer.to(torch.float16) if fp16 else buffer
            wire.div_(factor)
            future = dist.all_reduce(wire, async_op=True).get_future()

            def average(fut):
                buffer.copy_(fut.value()[0].mul_(factor / size))
                return buffer

            return future.then(average)

        return hook

    def no_sync(self, train_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one backward pass; ``sync=False`` keeps gradients local (accumulation).

        Horovod counts backward passes itself (``backward_passes_per_step``), so only DDP needs this.
        """
        if not sync and hasattr(train_model, "no_sync"):
            return train_model.no_sync()
        return contextlib.nullcontext()

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait until this step's gradient allreduce is done; gradients are then averaged over ranks.

        DDP finishes its allreduce inside the last backward pass, so there is nothing left to wait for.
        """
        if self._hvd is not None:
            self._wait_horovod(handle for handle, _ in getattr(optimizer, "_handles", {}).values())
            optimizer.synchronize()

    def _wait_horovod(self, handles: Iterable[Any]) -> None:
        """Sleep until Horovod's background thread has finished these operations (CPU ranks).

        ``hvd.synchronize`` waits in a ``sched_yield`` loop: on a CPU rank that loop shares the rank's
        cores with the background thread doing the allreduce and slows it (docs/studies.md, "Scaling on
        CPU ranks"). Polling with short sleeps leaves the core to the allreduce. On GPUs the wait is
        Horovod's own (the cores are free; a sleep would only add latency).
        """
        if self.device.type == "cuda":
            return
        pause = 50e-6
        for handle in handles:
            if handle is None or callable(handle):
                continue
            while not self._hvd.poll(handle):
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)

    def set_accumulate(self, optimizer: torch.optim.Optimizer, accumulate: int) -> None:
        """A new K for the distributed optimizer (an elastic run's world changed); DDP counts nothing itself."""
        if self._hvd is not None:
            optimizer.set_backward_passes_per_step(accumulate)

    # ------------------------------------------------------------------------------- elastic
    def elastic_state(self, commits: Any) -> Any:
        """Horovod's elastic state around ``commits`` (``save``, ``restore``, ``sync``, ``reset``): Horovod calls
        them on a commit, after a failed collective, when the ranks meet again, and after its reset (this
        engine's layout is refreshed first). ``state.commit()`` saves, then raises Horovod's
        ``HostsUpdatedInterrupt`` on every rank together when hosts were added or removed."""
        if self._hvd is None or os.environ.get("HOROVOD_ELASTIC") != "1":
            raise CoordinatedError("engine.elastic: true needs Horovod's elastic launcher (horovodrun --min-np/--max-np "
                                   "with --host-discovery-script, as the rendered job scripts start it); this job was "
                                   "started without it: set engine.elastic: false or launch it elastically", EXIT_CONFIG)
        from horovod.common.elastic import State

        hvd, engine = self._hvd, self

        class CommittedState(State):
            def __init__(self) -> None:
                super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)

            def save(self) -> None:
                commits.save()

            def restore(self) -> None:
                commits.restore()

            def sync(self) -> None:
                engine.refresh_layout()
                commits.sync()

            def reset(self) -> None:
                engine.refresh_layout()
                commits.reset()

        return CommittedState()

    def elastic_run(self, func: Any, state: Any, *args: Any) -> Any:
        """``func(state, *args)`` under Horovod's elastic loop: after a failed collective the survivors restore
        the last commit, every rank re-initializes Horovod with the new set of ranks, syncs from rank 0 and
        calls ``func`` again; a new rank starts by that sync."""
        return self._hvd.elastic.run(func)(state, *args)

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Optimizer step on gradients already synchronized (and unscaled and clipped by the caller)."""
        context = optimizer.skip_synchronize() if self._hvd is not None else contextlib.nullcontext()
        with context:
            scaler.step(optimizer)


def _state_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _state_from_bytes(payload: bytes, device: torch.device) -> dict[str, Any]:
    """The inverse of :func:`_state_bytes`, every tensor placed on ``device`` (the receiving rank's)."""
    return torch.load(io.BytesIO(payload), map_location=device, weights_only=False)


@contextlib.contextmanager
def started(cfg: EngineConfig) -> Iterator[Engine]:
    """An initialized engine, shut down on exit."""
    engine = Engine(cfg).init()
    try:
        yield engine
    except BaseException:
        engine.shutdown(clean=False)
        raise
    engine.shutdown()
