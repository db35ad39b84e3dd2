"""The shift's C++ ops (``csrc/shift_ops.cpp``): built once at install time, loaded if built.

A shifted layer's CPU training path runs as one op, ``torch.ops.tsm_dist.shifted_conv2d``, whose forward and
backward are C++ (the backward as hooks on the conv's own autograd node): one Python call per layer
(``shift_kernels.ShiftedConvCall``), and the layer input shifted in place around the conv and restored, not
copied (docs/models.md, issue #27). Built with Python's headers, the library is also a Python extension module
whose ``ShiftedConvPlan`` (:func:`plan`) calls that op with a layer's fixed arguments, without torch.ops'
conversions of every argument on every call, and checks in C++ whether the op takes the call.
The library is built by ``./install.sh`` (``python -m tsm_dist.commands.shift_ops build``: g++ and torch's
headers, no ninja, about a minute) into the venv, under a name keyed by the source and the torch build, so a
changed source or another torch never loads a stale library. Nothing is compiled at run time: when the
library is missing or does not load, :func:`available` is False and the Python kernels of
:mod:`tsm_dist.models.shift_kernels` run instead (same results, bit for bit). ``TSM_DIST_SHIFT_NATIVE=0``
turns the ops off (benchmarks compare both paths that way).

    python -m tsm_dist.commands.shift_ops build    # compile (no-op when built); one line
    python -m tsm_dist.commands.shift_ops status   # whether it is built and loads, one line
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

SOURCE = Path(__file__).with_name("csrc") / "shift_ops.cpp"
_state: dict[str, object] = {}


def _key() -> str:
    """The source, the torch build and the interpreter: any change names another library."""
    parts = [SOURCE.read_bytes(), torch.__version__.encode(), str(torch.version.git_version).encode(),
             str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(), sys.version.encode(), platform.machine().encode()]
    return hashlib.sha1(b"\0".join(parts)).hexdigest()[:12]


def library_path() -> Path:
    base = os.environ.get("TSM_DIST_NATIVE_DIR") or str(Path(sys.prefix) / "lib" / "tsm_dist-native")
    return Path(base) / f"shift_ops-{_key()}.so"


def _compile_command(output: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # With Python's headers the library is also the extension module of the layers' call (ShiftedConvPlan);
    # without them the ops alone are built and called through torch.ops.
    python_include = Path(sysconfig.get_paths()["include"])
    entry = ([f"-I{python_include}", "-DTSM_DIST_PYTHON_ENTRY"], ["-ltorch_python"]) \
        if (python_include / "Python.h").is_file() else ([], [])
    # -fopenmp: at::parallel_for is OpenMP code in torch's headers; libgomp.so.1 resolves to torch's own.
    return [os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", abi, *includes,
            *entry[0], str(SOURCE), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", *entry[1],
            f"-Wl,-rpath,{torch_lib}", "-o", str(output)]


def build() -> Path:
    """Compile the library unless it is there; raises RuntimeError with the compiler's last lines."""
    target = library_path()
    if target.exists():
        return target
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        done = subprocess.run(_compile_command(partial), capture_output=True, text=True)
        if done.returncode:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{tail}")
        os.replace(partial, target)  # atomic: ranks that load it never see half a file
    for stale in target.parent.glob("shift_ops-*.so"):  # other sources' or torches' (a loaded one stays mapped)
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def available() -> bool:
    """Whether the ops are loaded (loading them on the first call); False means the Python kernels run."""
    if "loaded" not in _state:
        _state["loaded"], _state["why"] = _load()
    return bool(_state["loaded"])


def why_not() -> str:
    available()
    return str(_state["why"])


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """The Python kernels run inside (tests and benchmarks compare both paths in one process)."""
    available()
    saved = dict(_state)
    _state.update(loaded=False, why="turned off by shift_native.turned_off()")
    _configure()
    try:
        yield
    finally:
        _state.update(saved)
        _configure()


def copy_numel() -> int:
    """Layer inputs of at most this many elements are read by the conv from a shifted copy (the op's copy
    method), larger ones are shifted in place. In place measured as fast or faster at every size (docs/models.md),
    so 0: the copy is the benchmarks' comparison (bench_models.py --copy-path), tested like every path."""
    return int(_state.get("copy_numel", 0))  # type: ignore[call-overload]


@contextlib.contextmanager
def copying(up_to: int) -> Iterator[None]:
    """Inside, the op shifts layer inputs of at most ``up_to`` elements while copying (see :func:`copy_numel`)."""
    saved = copy_numel()
    _state["copy_numel"] = up_to
    _configure()
    try:
        yield
    finally:
        _state["copy_numel"] = saved
        _configure()


def _configure() -> None:
    """What the Python entry's plans read on every call: whether the ops are on, and the copy method's size."""
    entry = _state.get("entry")
    if entry is not None:
        entry.configure(bool(_state.get("loaded")), copy_numel())  # type: ignore[attr-defined]


def _load() -> tuple[bool, str]:
    if os.environ.get("TSM_DIST_SHIFT_NATIVE", "1") == "0":
        return False, "turned off by TSM_DIST_SHIFT_NATIVE=0"
    if not SOURCE.is_file():
        return False, f"{SOURCE} is missing (an install without the C++ source)"
    path = library_path()
    if not path.exists():
        return False, ("not built for this source and torch (run ./install.sh, or python -m "
                       "tsm_dist.commands.shift_ops build)")
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return False, f"{path.name} does not load: {str(exc).splitlines()[0]}"
    _state["entry"] = _python_entry(path)
    if _state["entry"] is not None:
        _state["entry"].configure(True, copy_numel())  # type: ignore[attr-defined]
    return True, "loaded"


def _python_entry(path: Path) -> object | None:
    """The library as the Python module of the layers' call (``ShiftedConvPlan``), or None where it was built
    without Python's headers (the op is then called through torch.ops)."""
    name = "tsm_dist_shift_ops"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded  # a module initialises once per process (a second _load finds it here)
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
    except ImportError:  # no PyInit_tsm_dist_shift_ops: built without the entry
        return None
    sys.modules[name] = module
    return module


def plan(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, num_frames: int,
         fold: int, offsets: Sequence[int], channels: int) -> Callable | None:
    """A layer's ``ShiftedConvPlan.take``: ``take(x, weight, bias)`` is the layer's ``(conv2d(shift(x)), x)``
    through ``torch.ops.tsm_dist.shifted_conv2d`` where the op takes this call (a training step of a dense 4-d CPU
    input of ``channels`` channels in the conv's dtype, no autocast, no tensor subclass or torch-function mode: the
    checks in C++, the layer's fixed arguments held once), and None otherwise, for the caller's Python path.
    Without torch.ops' per-call argument conversions (14-20 us a call on the demo's layers) and the Python checks
    (16 us, docs/models.md). None when the library is not loaded or has no Python entry."""
    entry = _state.get("entry") if available() else None
    if entry is None:
        return None
    make = entry.ShiftedConvPlan  # type: ignore[attr-defined]
    return make(list(stride), list(padding), list(dilation), groups, num_frames, fold, list(offsets), channels).take


def summary() -> str:
    return "shift ops: C++" if available() else f"shift ops: Python ({why_not()})"
