"""Model benchmarks: the cost of the temporal shift, and the three models' throughput ratios.

    python benchmarks/bench_models.py shift       # TSM8f vs TSN (and a TSN control copy) training step, 224x224
    python benchmarks/bench_models.py small       # the demo's network and MobileNetV2-TSM at its size: TSM vs TSN
    python benchmarks/bench_models.py profile     # the demo's step by category (torch.profiler): TSN, TSM, TSM on Python
    python benchmarks/bench_models.py layers      # the fused shift's extra time per shifted layer, summed per step
    python benchmarks/bench_models.py ops         # dispatched aten ops per training step, two batch sizes
    python benchmarks/bench_models.py throughput  # TSM8f : I3D3x3x3 : I3D3x1x1 inference clips/s
    python benchmarks/bench_models.py all         # shift and throughput

Timings are interleaved (the order of the models alternates every round) so that drift and other
processes on a shared machine hit every model alike; each round gives a paired ratio and we print
the median and the spread of those ratios. With ``--compare`` two other shift implementations are
timed beside ours for scale: a plain out-of-place copy (every channel written once, opposite shift
in backward) and the reference implementation's (zero tensor, then slices assigned). The in-place
moves are also timed inside real TSM steps. ``layers`` times every distinct shifted conv of TSM8f-R50 alone
(forward + backward with its identity path, fused vs a plain conv of the same input, interleaved, the
minimum over repetitions since interference only adds time), sums the extra time over the network's
shifted layers and divides by a TSN step timed in the same run: a per-step overhead that other
processes disturb far less than the step-level ratio. ``ops`` counts the aten ops a training step dispatches
(views included; on a GPU each non-view op is a kernel launch) for TSN, our TSM8f and TSM8f with
the reference shift, at two batch sizes.
"""
from __future__ import annotations

import argparse
import collections
import resource
import statistics
import time
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tsm_dist.models.shift_kernels as sk
from tsm_dist.models import shift_native
from tsm_dist.models import build_model
from tsm_dist.models.temporal_shift import TemporalShift, shift_groups, temporal_shift

PAPER_P100 = {"tsm8f_r50": 84.8, "i3d3x3x3_r50": 63.1, "i3d3x1x1_r50": 41.9}


def plain_copy_shift(x: torch.Tensor, num_frames: int, fold_div: int) -> torch.Tensor:
    """Out-of-place shift, every element written once, the opposite shift in backward."""
    return sk.shift_copy(x, num_frames, shift_groups(x.shape[1], fold_div))


def _use_shift(model: torch.nn.Module, shift_fn: Callable[[torch.Tensor, int, int], torch.Tensor]) -> None:
    """Make the model's residual shifts ``conv(shift_fn(x))``, unfused."""
    for shift in model.shift_modules():
        shift.conv = types.MethodType(
            lambda self, x, conv: (conv(shift_fn(x, self.num_frames, self.fold_div)), x), shift)


def _median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median: the order statistics n/2 -+ 0.98 sqrt(n)
    (the binomial rank interval), so a benchmark states what its rounds can resolve."""
    ordered, n = sorted(values), len(values)
    k = max(0, int(n / 2 - 0.98 * n ** 0.5))
    return ordered[k], ordered[min(n - 1, n - 1 - k)]


def _summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    low, high = _median_ci(values)
    return (f"median {statistics.median(values):+.2%} (95% CI [{low:+.2%}, {high:+.2%}])  IQR [{q[0]:+.2%}, "
            f"{q[2]:+.2%}]  min {min(values):+.2%}  max {max(values):+.2%}  (n={len(values)})")


def _interleaved(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                 clock: Callable[[], float] = time.perf_counter,
                 faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Per model, the time of each round's step; ``faults`` receives each step's minor page faults (a fresh
    allocation above glibc's mmap threshold is zero-filled page by page on first touch)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = clock()
            steps[name]()
            times[name].append(clock() - start)
            if faults is not None:
                faults.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times


def _train_step(model: torch.nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(clips), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


SMALL = {"demo": ("tsm8f_r50", dict(depth=18, width=16, dropout=0.2)),  # configs/synthetic_tsm.yaml
         "mbv2": ("tsm8f_mbv2", dict(width=16, dropout=0.2)),  # configs/synthetic_tsm_mbv2.yaml, offline
         "mbv2-online": ("tsm8f_mbv2", dict(width=16, dropout=0.2, online=True))}


def _without_shift(model: torch.nn.Module) -> torch.nn.Module:
    """The same network without its shifts (TSN): every block that held a shift runs its plain branch."""
    for module in model.modules():
        if isinstance(getattr(module, "shift", None), TemporalShift):
            module.shift = None
    return model


def comparison_models(what: str, batch: int, size: int, channels_last: bool,
                      copy_path: bool = False) -> dict[str, Callable[[], None]]:
    """Training steps of TSN, a TSN control copy and TSM with the same weights and input: ``r50`` is
    TSM8f-R50 with 400 classes, the small ones the demo's network (``demo``) and MobileNetV2-TSM at the
    demo's size (``mbv2``, ``mbv2-online``: width 16, 4 classes, as the synthetic configs). Where the C++ op
    is built, TSM on the Python kernels too, and with ``copy_path`` TSM on the op's shifted-copy method."""
    name, options, classes = ("tsm8f_r50", {}, 400) if what == "r50" else (*SMALL[what], 4)

    def build(shift: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model(name, classes, **options)
        model = model if shift else _without_shift(model)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    models = {"TSN": build(False), "TSN control": build(False), "TSM": build(True)}
    if shift_native.available():  # the same TSM on the Python kernels, for the C++ ops' gain
        models["TSM, Python kernels"] = build(True)
        if copy_path:
            models["TSM, C++ copy"] = build(True)
    torch.manual_seed(1)
    clips = torch.randn(batch, models["TSM"].num_frames, 3, size, size)
    labels = torch.randint(0, classes, (batch,))
    steps = {n: _train_step(m, clips, labels) for n, m in models.items()}
    if "TSM, Python kernels" in steps:
        steps["TSM, Python kernels"] = _python_kernels(steps["TSM, Python kernels"])
    if "TSM, C++ copy" in steps:
        steps["TSM, C++ copy"] = _copy_path(steps["TSM, C++ copy"])
    return steps


def _copy_path(step: Callable[[], None]) -> Callable[[], None]:
    """The step with every CPU layer read by its conv from a shifted copy (the C++ op's other method)."""
    def copy_step() -> None:
        with shift_native.copying(1 << 62):
            step()
    return copy_step


def _python_kernels(step: Callable[[], None]) -> Callable[[], None]:
    def python_step() -> None:
        with shift_native.turned_off():
            step()
    return python_step


class _ShiftTimer:
    """Times, inside real TSM steps, the in-place moves (shift and undo, forward and backward) and the
    1x1 weight gradients computed by matmuls from the unshifted input (which replace the weight half of
    a ``convolution_backward`` TSN pays too, so they are not all overhead). Left out: the backward's
    move-back of the input gradient, folded into the identity-gradient sum that TSN pays for in
    autograd too; the step-level comparison above covers everything."""

    _NAMES = ("_shift_inplace", "_unshift_inplace", "_weight_grad_1x1")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self._NAMES, 0.0)
        self._originals = {name: getattr(sk, name) for name in self._NAMES}

    def _timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args):
            start = time.perf_counter()
            result = fn(*args)
            self.seconds[name] += time.perf_counter() - start
            return result
        return wrapper

    def __enter__(self) -> "_ShiftTimer":
        for name, fn in self._originals.items():
            setattr(sk, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._originals.items():
            setattr(sk, name, fn)


def bench_shift(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    tsn = build_model("tsn8f_r50", 400)
    # A second TSN shows the noise floor of the ratios (its true overhead is zero).
    models = {"TSN": tsn, "TSN, control copy": build_model("tsn8f_r50", 400), "TSM8f": build_model("tsm8f_r50", 400)}
    if args.compare:
        models["TSM8f, plain copy shift"] = build_model("tsm8f_r50", 400)
        _use_shift(models["TSM8f, plain copy shift"], plain_copy_shift)
        models["TSM8f, reference shift"] = build_model("tsm8f_r50", 400)
        _use_shift(models["TSM8f, reference shift"], temporal_shift)
    if args.copy_path and shift_native.available():
        models["TSM8f, C++ copy path"] = build_model("tsm8f_r50", 400)
    if args.python_kernels and shift_native.available():
        models["TSM8f, Python kernels"] = build_model("tsm8f_r50", 400)
    for model in models.values():
        model.load_state_dict(tsn.state_dict())  # same weights: the shift is the only difference
    clips = torch.randn(args.batch, 8, 3, args.size, args.size)
    labels = torch.randint(0, 400, (args.batch,))
    steps = {name: _train_step(model, clips, labels) for name, model in models.items()}
    if "TSM8f, C++ copy path" in steps:
        steps["TSM8f, C++ copy path"] = _copy_path(steps["TSM8f, C++ copy path"])
    if "TSM8f, Python kernels" in steps:
        steps["TSM8f, Python kernels"] = _python_kernels(steps["TSM8f, Python kernels"])
    clock = "process CPU time" if args.cpu_time else "wall time"
    print(f"# shift overhead: training step (fwd+bwd+SGD), batch {args.batch} x 8 frames x {args.size}^2, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds after {args.warmup} warm-up, {clock}")
    faults: dict[str, list[int]] = {}
    times = _interleaved(steps, args.rounds, args.warmup, time.process_time if args.cpu_time else time.perf_counter,
                         faults)
    for name, samples in times.items():
        print(f"{name:<24} step median {statistics.median(samples):.3f} s  min {min(samples):.3f}  max {max(samples):.3f}"
              f"  minor page faults per step: median {statistics.median(faults[name]):.0f}")
    base = times["TSN"]
    for name in [n for n in times if n != "TSN"]:
        ratios = [t / b - 1 for t, b in zip(times[name], base)]
        print(f"{name:<24} overhead vs TSN per round: {_summary(ratios)}")
    _time_python_moves(steps, statistics.median(base))


def _time_python_moves(steps: dict[str, Callable[[], None]], tsn_step: float) -> None:
    """The Python kernels' in-place moves and matmuls inside their TSM8f steps (the C++ op's are not Python)."""
    name = "TSM8f, Python kernels" if shift_native.available() else "TSM8f"
    if name not in steps:
        return
    moves, matmuls = [], []
    with _ShiftTimer() as timer:
        for _ in range(3):
            timer.seconds = dict.fromkeys(timer.seconds, 0.0)
            steps[name]()
            matmuls.append(timer.seconds["_weight_grad_1x1"])
            moves.append(timer.seconds["_shift_inplace"] + timer.seconds["_unshift_inplace"])
    for what, samples in [("in-place moves (shift + undo)", moves), ("1x1 weight gradients by matmul", matmuls)]:
        print(f"{what} inside a {name} step: {statistics.median(samples) * 1e3:.1f} ms = "
              f"{statistics.median(samples) / tsn_step:.2%} of the median TSN step")


def bench_small(args: argparse.Namespace) -> None:
    """The demo's network and MobileNetV2-TSM at the demo's size: TSM vs TSN (and a TSN control copy)."""
    clock = time.process_time if args.cpu_time else time.perf_counter
    for what in args.small:
        steps = comparison_models(what, args.small_batch, args.small_size, channels_last=True,
                                  copy_path=args.copy_path)
        print(f"# {what}: TSM vs TSN training step, batch {args.small_batch} x 8 frames x {args.small_size}^2, "
              f"channels-last, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds after "
              f"{args.warmup} warm-up, {'process CPU time' if args.cpu_time else 'wall time'}")
        faults: dict[str, list[int]] = {}
        times = _interleaved(steps, args.rounds, args.warmup, clock, faults)
        for name, samples in times.items():
            print(f"{name:<20} step median {statistics.median(samples) * 1e3:7.2f} ms  min {min(samples) * 1e3:7.2f}"
                  f"  minor page faults per step: median {statistics.median(faults[name]):.0f}")
        for name in [n for n in times if n != "TSN"]:
            ratios = [t / b - 1 for t, b in zip(times[name], times["TSN"])]
            print(f"{name:<20} vs TSN per round: {_summary(ratios)}; ratio of medians "
                  f"{statistics.median(times[name]) / statistics.median(times['TSN']) - 1:+.2%}")


# profiler event -> category of the step breakdown (self CPU time; an event's children are counted apart)
_CATEGORIES = (("shift: Python of the autograd.Function", ("_ShiftedConvFn",)),
               ("shift: C++ op, forward (with its moves)", ("tsm_dist::shifted_conv2d", "ShiftedCopyConv")),
               ("conv nodes (TSM: + the shift's bwd hooks)", ("evaluate_function: ConvolutionBackward0",)),
               ("shift: C++ passes (shift_copy, shift_add_)", ("tsm_dist::shift",)),
               ("convolutions (fwd + bwd)", ("aten::mkldnn_convolution", "aten::convolution_backward")),
               ("aten copies, fills, adds", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::add", "aten::cat")),
               ("batch norm, ReLU, pooling", ("batch_norm", "threshold", "relu", "clamp", "max_pool")))


def _category(key: str) -> str:
    return next((name for name, marks in _CATEGORIES if any(m in key for m in marks)), "the rest")


def bench_profile(args: argparse.Namespace) -> None:
    """torch.profiler over whole training steps of the demo's network, one profiled step per model and round,
    interleaved: self CPU time per category and step."""
    from torch.profiler import ProfilerActivity, profile

    steps = comparison_models("demo", args.small_batch, args.small_size, channels_last=True)
    steps.pop("TSN control")
    per_step = {name: collections.Counter() for name in steps}
    for r in range(args.warmup + args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            if r < args.warmup:
                steps[name]()
                continue
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name]()
            for event in prof.key_averages():
                per_step[name][_category(event.key)] += event.self_cpu_time_total / args.rounds / 1e3
    print(f"# demo step breakdown, self CPU ms per step (torch.profiler, {args.rounds} interleaved rounds after "
          f"{args.warmup}, {torch.get_num_threads()} threads; the profiler's overhead inflates the Python rows)")
    print(f"{'category':<46}" + "".join(f"{n:>24}" for n in per_step))
    for category in [c for c, _ in _CATEGORIES] + ["the rest", "total"]:
        row = [sum(c.values()) if category == "total" else c[category] for c in per_step.values()]
        print(f"{category:<46}" + "".join(f"{v:>16.2f} ({v - row[0]:+5.2f})" for v in row))


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def step_ops(model: torch.nn.Module, batch: int, size: int) -> int:
    """Aten ops one training step (forward, loss, backward, SGD) of ``model`` dispatches."""
    clips = torch.randn(batch, model.num_frames, 3, size, size)
    labels = torch.randint(0, 5, (batch,))
    step = _train_step(model, clips, labels)
    step()  # the optimizer's state exists from the second step on
    with _OpCounter() as counter:
        step()
    return counter.ops


def _shifted_layers(size: int) -> collections.Counter:
    """Every distinct shifted conv of TSM8f-R50 at ``size``: (input shape, conv) -> how often it occurs."""
    seen: collections.Counter = collections.Counter()
    original = TemporalShift.conv

    def record(self, x: torch.Tensor, conv: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
        seen[(tuple(x.shape), conv.out_channels, conv.kernel_size, conv.stride, conv.padding)] += 1
        return original(self, x, conv)

    TemporalShift.conv = record
    try:
        with torch.no_grad():
            build_model("tsm8f_r50", 400)(torch.randn(1, 8, 3, size, size))
    finally:
        TemporalShift.conv = original
    return seen


def _layer_step(shape: tuple, out_channels: int, kernel: tuple, stride: tuple, padding: tuple,
                fused: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    x, groups = torch.randn(shape), shift_groups(shape[1], 8)
    weight = torch.randn(out_channels, shape[1], *kernel, requires_grad=True)
    grad_y = torch.randn_like(F.conv2d(x, weight.detach(), None, stride, padding))

    def step() -> None:
        xx = x.detach().requires_grad_()
        if fused:
            y, identity = sk.shifted_conv2d_and_identity(xx, weight, None, 8, groups, stride, padding)
        else:
            y, identity = F.conv2d(xx, weight, None, stride, padding), xx
        torch.autograd.backward([y, identity], [grad_y, x])
        weight.grad = None

    return step


def bench_layers(args: argparse.Namespace) -> None:
    layers = _shifted_layers(args.size)
    print(f"# fused shift per shifted layer of TSM8f-R50 (fwd+bwd, identity path included) vs a plain conv, "
          f"{args.size}^2, 8 frames, {torch.get_num_threads()} threads, min over {args.rounds} interleaved reps")
    extra = 0.0
    for (shape, out_channels, kernel, stride, padding), count in layers.items():
        steps = {f: _layer_step(shape, out_channels, kernel, stride, padding, f) for f in (False, True)}
        times = _interleaved({"plain": steps[False], "fused": steps[True]}, args.rounds, args.warmup)
        plain, fused = min(times["plain"]), min(times["fused"])
        extra += count * (fused - plain)
        print(f"{count} x {shape[1]:>4}->{out_channels:<4} at {shape[2]:>3}^2: plain {plain * 1e3:7.2f} ms  "
              f"fused {fused * 1e3:7.2f} ms  extra {(fused - plain) * 1e3:+6.2f} ms ({fused / plain - 1:+.1%})")
    torch.manual_seed(0)
    tsn = build_model("tsn8f_r50", 400)
    step = _train_step(tsn, torch.randn(1, 8, 3, args.size, args.size), torch.randint(0, 400, (1,)))
    tsn_step = min(_interleaved({"TSN": step}, max(3, args.rounds // 4), 1)["TSN"])
    print(f"extra per step over {sum(layers.values())} shifted layers: {extra * 1e3:+.1f} ms = {extra / tsn_step:+.2%} "
          f"of a TSN training step ({tsn_step:.3f} s, batch 1, min)")


def bench_ops(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    width = dict(depth=50, width=args.ops_width, dropout=0.0)
    models = {"TSN": build_model("tsn8f_r50", 5, **width), "TSM8f": build_model("tsm8f_r50", 5, **width),
              "TSM8f, reference shift": build_model("tsm8f_r50", 5, **width)}
    _use_shift(models["TSM8f, reference shift"], temporal_shift)
    shifted = len(list(models["TSM8f"].shift_modules()))
    print(f"# dispatched aten ops per training step (views included), R50 width {args.ops_width}, "
          f"{args.ops_size}^2 crops, 8 frames, {shifted} shifted layers")
    counts = {name: [step_ops(m, b, args.ops_size) for b in args.ops_batches] for name, m in models.items()}
    print(f"{'model':<24}" + "".join(f"{f'batch {b}':>10}" for b in args.ops_batches) + "   per shifted layer vs TSN")
    for name, ops in counts.items():
        extra = "" if name == "TSN" else "  ".join(f"{(o - t) / shifted:.1f}" for o, t in zip(ops, counts["TSN"]))
        print(f"{name:<24}" + "".join(f"{o:>10}" for o in ops) + f"   {extra}")


def bench_throughput(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    names = ("tsm8f_r50", "i3d3x3x3_r50", "i3d3x1x1_r50")
    models = {n: build_model(n, 400).eval() for n in names}
    clips = {n: torch.randn(args.tp_batch, m.num_frames, 3, args.size, args.size) for n, m in models.items()}

    def infer(name: str) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode():
                models[name](clips[name])
        return step

    print(f"# inference throughput, batch {args.tp_batch} clips at {args.size}^2, "
          f"{torch.get_num_threads()} threads, {args.tp_rounds} interleaved rounds after 1 warm-up")
    times = _interleaved({n: infer(n) for n in names}, args.tp_rounds, 1)
    rate = {n: args.tp_batch / statistics.median(ts) for n, ts in times.items()}
    base = "i3d3x1x1_r50"
    print(f"{'model':<14} {'clips/s':>8} {'ratio':>7}   paper P100 clips/s (ratio)")
    for n in names:
        paper = PAPER_P100[n]
        print(f"{n:<14} {rate[n]:>8.3f} {rate[n] / rate[base]:>6.2f}x   {paper:.1f} ({paper / PAPER_P100[base]:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["shift", "small", "profile", "layers", "ops", "throughput", "all"], nargs="?",
                   default="all")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1, help="clips per training step (shift benchmark)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--copy-path", action="store_true",
                   help="shift, small: also TSM with every layer read from a shifted copy by the C++ op (more memory)")
    p.add_argument("--python-kernels", action="store_true",
                   help="shift: also TSM8f on the Python kernels (what runs where the C++ op is not built)")
    p.add_argument("--compare", action="store_true",
                   help="also time the plain-copy and the reference shift (4 models in memory: noisier)")
    p.add_argument("--small", type=lambda v: v.split(","), default=["demo", "mbv2"],
                   help="small models (small): demo, mbv2, mbv2-online, comma-separated")
    p.add_argument("--small-batch", type=int, default=8, help="clips per step (small; the demo's 8)")
    p.add_argument("--small-size", type=int, default=56, help="crop size (small; the demo's 56)")
    p.add_argument("--tp-batch", type=int, default=2, help="clips per inference batch (throughput)")
    p.add_argument("--tp-rounds", type=int, default=5)
    p.add_argument("--ops-batches", type=int, nargs="+", default=[2, 8], help="batch sizes (ops)")
    p.add_argument("--ops-width", type=int, default=16, help="ResNet base width (ops)")
    p.add_argument("--ops-size", type=int, default=32, help="crop size (ops)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time steps by process CPU time (with --threads 1: immune to being descheduled)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what in ("shift", "all"):
        bench_shift(args)
    if args.what == "small":
        bench_small(args)
    if args.what == "profile":
        bench_profile(args)
    if args.what == "layers":
        bench_layers(args)
    if args.what == "ops":
        bench_ops(args)
    if args.what in ("throughput", "all"):
        bench_throughput(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
