"""GPU build settings for Horovod, computed by ``install.sh`` (stdlib only; run with the venv's python).

    python tools/install_gpu.py horovod-env --torch-cuda 12.4 --work DIR   # prints `export K=V` lines
    python tools/install_gpu.py patch-horovod SRC                           # C++17 / CUDA 17 source patches
    python tools/install_gpu.py deps --setup-cfg setup.cfg                  # what pip installs besides
                                                                            # torch, Horovod and mpi4py

``horovod-env`` (only when torch has CUDA) decides, or stops with one clear line on stderr (exit 1):

* the CUDA compiler: ``HOROVOD_CUDA_HOME`` / ``CUDA_HOME`` / ``CUDA_PATH`` (must hold ``bin/nvcc``), else
  the toolkit of the ``nvcc`` on ``PATH`` (a wrapper script is asked where its toolkit is). Horovod's GPU kernels are compiled with nvcc, so without one the build would fail
  minutes later deep in CMake;
* NCCL: ``HOROVOD_NCCL_HOME`` / ``HOROVOD_NCCL_INCLUDE`` if set, else the ``nvidia-nccl-cu*`` wheel that
  ships with pip's CUDA torch. ``nvidia.nccl`` is a namespace package (``__file__`` is None), so it is
  found through its package path (``submodule_search_locations``); its ``lib/`` has only
  ``libnccl.so.2``, so a ``libnccl.so`` link is made under ``--work`` for CMake's ``find_library``;
* ``HOROVOD_BUILD_CUDA_CC_LIST``: kept if set; else the compute capabilities of the node's GPUs
  (``nvidia-smi``, then torch); on a node without GPUs (a login node) the architectures torch itself was
  built for.
  Without it, Horovod compiles every architecture nvcc knows (slow, and the newest may not build).

``patch-horovod`` makes Horovod 0.28.1 compile as C++17 (torch >= 2.1 headers need it) and its CUDA
kernels as CUDA C++17 (``CMAKE_CUDA_STANDARD 11`` fails with recent host compilers), and fails if a patch
no longer applies.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence


class InstallError(Exception):
    """A problem the user must fix; the message is the one line install.sh prints."""


# ------------------------------------------------------------------------------------------ CUDA compiler
def nvcc_release(nvcc: str) -> str | None:
    """'12.4' from ``nvcc --version`` ("Cuda compilation tools, release 12.4, V12.4.131")."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def find_cuda_home(env: Mapping[str, str], torch_cuda: str) -> str:
    """The CUDA toolkit to build with (a directory with ``bin/nvcc``), or InstallError saying what to do."""
    for var in ("HOROVOD_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            if not os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
                raise InstallError(f"{var}={home} has no bin/nvcc: point {var} at a CUDA toolkit "
                                   f"(CUDA {torch_cuda} matches torch) or unset it")
            return home
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc is None:
        raise InstallError(
            f"torch is built with CUDA {torch_cuda}, so Horovod is built with NCCL GPU operations, which needs "
            f"the CUDA compiler: nvcc is not on PATH and CUDA_HOME is not set. Load the CUDA toolkit (e.g. "
            f"'module load cuda/{torch_cuda}') or set CUDA_HOME=/usr/local/cuda-{torch_cuda}, then run "
            "./install.sh again")
    home = Path(os.path.realpath(nvcc)).parent.parent
    if not (home / "include" / "cuda_runtime.h").is_file():  # a wrapper script (e.g. /usr/local/bin/nvcc)
        home = _nvcc_own_home(nvcc) or home
        if not (home / "include" / "cuda_runtime.h").is_file():
            raise InstallError(f"{nvcc} is not inside a CUDA toolkit (no include/cuda_runtime.h near it, and it "
                               "does not say where it lives): set CUDA_HOME to the toolkit's directory")
    return str(home)


def _nvcc_own_home(nvcc: str) -> Path | None:
    """The toolkit an nvcc wrapper really runs, from its dry run ("#$ _HERE_=/usr/local/cuda-13.0/bin")."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    return Path(match.group(1).strip()).parent if match else None


# --------------------------------------------------------------------------------------------------- NCCL
def nccl_package_dirs() -> list[str]:
    """Directories of the ``nvidia.nccl`` package (a namespace package: no ``__file__``)."""
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    return [str(p) for p in (spec.submodule_search_locations or [])]


def find_nccl(work: str) -> dict[str, str]:
    """Horovod's NCCL variables for the nvidia-nccl wheel; {} if the wheel is not installed."""
    for base in nccl_package_dirs():
        include, lib = Path(base, "include"), Path(base, "lib")
        libs = sorted(lib.glob("libnccl.so*"))
        if not (include / "nccl.h").is_file() or not libs:
            continue
        if not (lib / "libnccl.so").exists():  # the wheel ships only the versioned name
            links = Path(work, "nccl-lib")
            links.mkdir(parents=True, exist_ok=True)
            link = links / "libnccl.so"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(libs[-1])
            lib = links
        return {"HOROVOD_NCCL_HOME": base, "HOROVOD_NCCL_INCLUDE": str(include), "HOROVOD_NCCL_LIB": str(lib),
                "HOROVOD_NCCL_LINK": "SHARED"}
    return {}


# ---------------------------------------------------------------------------------- compute capabilities
def _torch_capabilities() -> list[tuple[int, int]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def _smi_capabilities(env: Mapping[str, str]) -> list[tuple[int, int]]:
    smi = shutil.which("nvidia-smi", path=env.get("PATH", ""))
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    caps = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if match:
            caps.append((int(match.group(1)), int(match.group(2))))
    return caps


def _torch_arch_list() -> list[tuple[int, int]]:
    try:
        import torch
    except ImportError:
        return []
    caps = []
    for arch in torch.cuda.get_arch_list():
        match = re.fullmatch(r"sm_(\d+)(\d)[a-z]?", arch)
        if match:
            caps.append((int(match.group(1)), int(match.group(2))))
    return caps


def cuda_cc_list(env: Mapping[str, str],
                 torch_caps: Callable[[], list[tuple[int, int]]] = _torch_capabilities,
                 arch_list: Callable[[], list[tuple[int, int]]] = _torch_arch_list) -> tuple[str | None, str]:
    """(HOROVOD_BUILD_CUDA_CC_LIST value or None, where it came from)."""
    if env.get("HOROVOD_BUILD_CUDA_CC_LIST"):
        return env["HOROVOD_BUILD_CUDA_CC_LIST"], "HOROVOD_BUILD_CUDA_CC_LIST as set"
    for source, found in (("the GPUs nvidia-smi lists", lambda: _smi_capabilities(env)),
                          ("the GPUs torch sees", torch_caps),
                          ("torch's own CUDA architectures (no GPU visible here)", arch_list)):
        caps = sorted(set(found()))
        if caps:
            return ",".join(f"{major}{minor}" for major, minor in caps), source
    return None, "nothing found: Horovod compiles every architecture nvcc knows"


def horovod_env(env: Mapping[str, str], torch_cuda: str, work: str) -> tuple[dict[str, str], list[str]]:
    """(variables to export, notes to print) for a CUDA build of Horovod."""
    notes = []
    home = find_cuda_home(env, torch_cuda)
    out = {"HOROVOD_GPU_OPERATIONS": "NCCL", "HOROVOD_CUDA_HOME": home, "CUDA_HOME": home}
    release = nvcc_release(os.path.join(home, "bin", "nvcc"))
    notes.append(f"CUDA compiler: {home}/bin/nvcc (release {release or 'unknown'})")
    if release and release.split(".")[0] != torch_cuda.split(".")[0]:
        notes.append(f"WARNING: nvcc is CUDA {release} but torch is built with CUDA {torch_cuda}: load the "
                     "matching toolkit if the build or NCCL fails")
    if env.get("HOROVOD_NCCL_HOME") or env.get("HOROVOD_NCCL_INCLUDE"):
        notes.append(f"NCCL: {env.get('HOROVOD_NCCL_HOME') or env.get('HOROVOD_NCCL_INCLUDE')} (as set)")
    else:
        nccl = find_nccl(work)
        if not nccl:
            raise InstallError("torch has CUDA but NCCL was not found: the nvidia-nccl wheel (nvidia.nccl) is not "
                               "installed in this venv; install it (pip install nvidia-nccl-cu"
                               f"{torch_cuda.split('.')[0]}) or set HOROVOD_NCCL_HOME to an NCCL installation")
        out.update(nccl)
        notes.append(f"NCCL: {nccl['HOROVOD_NCCL_HOME']} (nvidia-nccl wheel)")
    cc, source = cuda_cc_list(env)
    if cc:
        out["HOROVOD_BUILD_CUDA_CC_LIST"] = cc
    notes.append(f"CUDA architectures: {cc or 'all'} ({source})")
    return out, notes


# ----------------------------------------------------------------------------------------- source patches
# (file, old, new, required): required patches must apply once at least, or the sources have changed
PATCHES: Sequence[tuple[str, str, str, bool]] = (
    ("CMakeLists.txt", "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)", True),
    ("horovod/torch/CMakeLists.txt", "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)", True),
    ("CMakeLists.txt", "CMAKE_CUDA_FLAGS} -std=c++11", "CMAKE_CUDA_FLAGS} -std=c++17", False),  # ppc64le
    ("horovod/common/ops/cuda/CMakeLists.txt", "set(CMAKE_CUDA_STANDARD 11)", "set(CMAKE_CUDA_STANDARD 17)", True),
)


def patch_horovod(src: str) -> list[str]:
    """Apply :data:`PATCHES` under ``src``; returns what was patched; InstallError if one did not apply."""
    done = []
    for name, old, new, required in PATCHES:
        path = Path(src, name)
        text = path.read_text() if path.is_file() else ""
        if old in text:
            path.write_text(text.replace(old, new))
            done.append(f"{name}: {new}")
        elif required and new not in text:
            raise InstallError(f"cannot patch {path}: '{old}' not found (not the Horovod 0.28.1 sources?)")
    return done


# --------------------------------------------------------------------------------------------- dependencies
BUILT_ON_THE_NODE = ("torch", "horovod", "mpi4py")  # the node's own torch; the other two are built against it


def plain_dependencies(setup_cfg: str) -> list[str]:
    """tsm_dist's requirements (``install_requires`` and the ``test`` extra) without :data:`BUILT_ON_THE_NODE`:
    what an offline wheelhouse carries and what an install without Horovod or MPI gives pip."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg.get("options", "install_requires").splitlines()
    if cfg.has_option("options.extras_require", "test"):
        lines += cfg.get("options.extras_require", "test").splitlines()
    reqs = [line.split("#")[0].strip() for line in lines]
    return [r for r in reqs if r and re.split(r"[<>=!~\[ ;]", r)[0].lower() not in BUILT_ON_THE_NODE]


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install_gpu.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env_cmd = sub.add_parser("horovod-env", help="print `export` lines for a CUDA build of Horovod")
    env_cmd.add_argument("--torch-cuda", required=True, help="torch.version.cuda, e.g. 12.4")
    env_cmd.add_argument("--work", required=True, help="directory for the libnccl.so link")
    patch_cmd = sub.add_parser("patch-horovod", help="patch Horovod's sources to C++17 / CUDA C++17")
    patch_cmd.add_argument("src")
    deps_cmd = sub.add_parser("deps", help="print tsm_dist's requirements other than torch, Horovod and mpi4py")
    deps_cmd.add_argument("--setup-cfg", required=True)
    args = parser.parse_args(argv)
    if args.command == "deps":
        print("\n".join(plain_dependencies(args.setup_cfg)))
        return 0
    try:
        if args.command == "patch-horovod":
            for line in patch_horovod(args.src):
                print(f"patched {line}")
            return 0
        variables, notes = horovod_env(os.environ, args.torch_cuda, args.work)
    except InstallError as err:
        print(f"[install] ERROR: {err}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"[install] {note}", file=sys.stderr)
    for key, value in variables.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
