#!/usr/bin/env bash
# One-command install of tsm_dist and its distributed stack into ./.venv:
#   torch (kept if you bring one) -> OpenMPI (system/module, or apt) -> Horovod 0.28.1 (patched to C++17,
#   PyTorch + Gloo + MPI controllers, NCCL ops when torch has CUDA; wheel cached) -> mpi4py (same MPI)
#   -> NVIDIA DALI -> tsm_dist (editable) with pyyaml, wandb, PyAV, pytest -> the shift's C++ ops (g++).
# Idempotent: a second run only checks.
# Air-gapped GPU nodes (no internet, no apt, a CUDA torch already there):
#   ./install.sh --wheelhouse DIR [--with-dali]   on a login node: download into DIR what the node lacks
#                                                 (Horovod's sdist, the pure-Python deps; DALI if asked)
#   ./install.sh --offline DIR                    on the node: install from DIR only; Horovod is built there
#                                                 (Gloo + NCCL; MPI only if the node has one), timed, cached;
#                                                 without a DALI wheel in DIR, DALI is skipped
# With a CUDA torch but no nvcc, Horovod is skipped with one line saying what its GPU build needs; DALI,
# tsm_dist and the torch engine are still installed. Environment knobs (all optional):
#   TORCH_SPEC="torch==2.5.1"          install this torch instead of the default torch==2.13.0
#   TSM_DIST_SYSTEM_SITE_PACKAGES=1    create the venv with --system-site-packages (cluster torch modules)
#   TSM_DIST_VENV=/path/.venv          where the venv lives (default: <repo>/.venv)
#   TSM_DIST_CACHE=/path               built-wheel cache (default: ~/.cache/tsm_dist)
#   PYTHON=python3.11                  interpreter that creates the venv
#   TSM_DIST_NO_MPI=1                  ignore the MPI on PATH: Horovod with Gloo only, no mpi4py
#   HOROVOD_NCCL_HOME=/path            NCCL for Horovod's GPU ops (default: torch's nvidia-nccl wheel)
#   CUDA_HOME=/path                    CUDA toolkit for Horovod's GPU build (default: the nvcc on PATH)
#   HOROVOD_BUILD_CUDA_CC_LIST=80,90   GPU architectures to compile (default: the visible GPUs')
# The GPU build logic lives in tools/install_gpu.py (tested on CPU by tests/stack/test_install_gpu.py).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WHEELHOUSE="" OFFLINE="" WITH_DALI=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
    --offline) OFFLINE=${2:?--offline needs a directory}; shift 2 ;;
    --with-dali) WITH_DALI=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) printf '[install] ERROR: unknown option %s (see ./install.sh --help)\n' "$1" >&2; exit 2 ;;
  esac
done
VENV=${TSM_DIST_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
HOROVOD_VERSION=0.28.1
DEFAULT_TORCH="torch==2.13.0"
CACHE=${TSM_DIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tsm_dist}
LOGS=$ROOT/.install-logs
mkdir -p "$CACHE" "$LOGS"

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }
pipq() {  # quiet pip install; shows pip's output only when it fails
  local rc=0
  "$PY" -m pip install --disable-pip-version-check -q "$@" >"$LOGS/pip.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { grep -v "is ignored: it is neither" "$LOGS/pip.log" | tail -n 30 >&2; die "pip install $* failed"; }
}
py_ok() { "$PY" -c "$1" >/dev/null 2>&1; }
as_root_with_apt() { [ -z "$OFFLINE" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# --- 0. a wheelhouse for an air-gapped node (run on a login node, with the node's Python version) -------
if [ -n "$WHEELHOUSE" ]; then
  mkdir -p "$WHEELHOUSE"
  P=${PYTHON:-python3}
  # tsm_dist's own dependencies from setup.cfg, less torch (the node has its CUDA build) and horovod/mpi4py
  # (built on the node, against its torch and MPI)
  mapfile -t DEPS < <("$P" "$ROOT/tools/install_gpu.py" deps --setup-cfg "$ROOT/setup.cfg")
  say "wheelhouse $WHEELHOUSE: Horovod $HOROVOD_VERSION source and ${#DEPS[@]} dependencies"
  "$P" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WHEELHOUSE"
  "$P" -m pip download --disable-pip-version-check -q -d "$WHEELHOUSE" "setuptools>=64" wheel cffi cloudpickle psutil \
    packaging "cmake>=3.13" "${DEPS[@]}"
  if [ "$WITH_DALI" = 1 ]; then "$P" -m pip download --disable-pip-version-check -q -d "$WHEELHOUSE" "${DALI_PKG:-nvidia-dali-cuda130}"; fi
  rm -f "$WHEELHOUSE"/torch-*.whl "$WHEELHOUSE"/nvidia_*cu1[0-9]*.whl  # never carry a second torch stack
  say "wheelhouse ready: $(du -sh "$WHEELHOUSE" | cut -f1) in $WHEELHOUSE; on the node: ./install.sh --offline $WHEELHOUSE"
  exit 0
fi
if [ -n "$OFFLINE" ]; then
  [ -d "$OFFLINE" ] || die "--offline $OFFLINE: no such directory (make it with ./install.sh --wheelhouse on a login node)"
  OFFLINE=$(cd "$OFFLINE" && pwd)
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$OFFLINE"  # every pip below, the Horovod build's included
  say "offline: installing from $OFFLINE only"
fi

# --- 1. virtual environment --------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  say "creating $VENV"
  args=()
  [ "${TSM_DIST_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && args+=(--system-site-packages)
  "${PYTHON:-python3}" -m venv "${args[@]}" "$VENV" || die "could not create a venv with ${PYTHON:-python3} (install python3-venv)"
fi
# Horovod's and mpi4py's builds run inside this venv (they must see its torch), so it needs the build tools.
py_ok "import setuptools, wheel, cffi, cloudpickle, psutil, yaml, packaging" ||
  pipq "setuptools>=64" wheel cffi cloudpickle psutil pyyaml packaging

# --- 2. torch: keep the user's, else the pinned default ----------------------------------------------
if [ -n "${TORCH_SPEC:-}" ]; then
  say "installing $TORCH_SPEC (TORCH_SPEC)"
  pipq "$TORCH_SPEC"
elif py_ok "import torch"; then
  say "keeping torch $("$PY" -c 'import torch; print(torch.__version__)') found in the venv"
else
  say "installing $DEFAULT_TORCH"
  pipq "$DEFAULT_TORCH"
fi
read -r TORCH_VERSION TORCH_CUDA < <("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or 'cpu')") ||
  die "torch does not import in $VENV"
PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")

# --- 3. MPI: the cluster's (module) or the system's; apt only as a last resort -----------------------
if [ "${TSM_DIST_NO_MPI:-0}" = 1 ]; then
  say "TSM_DIST_NO_MPI=1: Horovod is built with Gloo only and mpi4py is skipped"
elif ! command -v mpicc >/dev/null 2>&1; then
  if as_root_with_apt; then
    say "no mpicc on PATH: installing OpenMPI with apt (libopenmpi-dev openmpi-bin)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq libopenmpi-dev openmpi-bin; } >"$LOGS/apt-openmpi.log" 2>&1 ||
      { tail -n 20 "$LOGS/apt-openmpi.log"; die "apt-get could not install OpenMPI (log: $LOGS/apt-openmpi.log)"; }
  else
    say "no MPI found (mpicc is not on PATH): Horovod is built with Gloo only and mpi4py is skipped (for MPI,
       load your cluster's MPI, e.g. 'module load openmpi', or install OpenMPI, then run ./install.sh again)"
  fi
fi
MPICC=$([ "${TSM_DIST_NO_MPI:-0}" = 1 ] || command -v mpicc || true)
MPI_FLAVOUR=$( { [ -n "$MPICC" ] && mpirun --version 2>/dev/null | head -n 1; } || echo "no MPI")
MPI_KEY=$(printf '%s|%s' "$MPICC" "$MPI_FLAVOUR" | sha1sum | cut -c1-10)
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

# Builds a wheel once per key into the cache and installs it; a venv already holding that key is left alone.
# usage: cached_wheel NAME KEY BUILD_FUNCTION
cached_wheel() {
  local name=$1 key=$2 build=$3 stamp="$VENV/.tsm_dist-$1.key" dir="$CACHE/wheels/$1/$2"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && py_ok "import $name"; then
    say "$name: already built for this stack ($key)"
    return 0
  fi
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    local log="$LOGS/build-$name.log" tmp started=$SECONDS
    tmp=$(mktemp -d "$CACHE/build-$name.XXXXXX")
    say "$name: building wheel (log: $log)"
    if ! (cd "$tmp" && "$build" "$tmp") >"$log" 2>&1; then
      echo "----- last lines of $log -----" >&2
      tail -n 40 "$log" >&2
      echo "----- likely cause -----" >&2
      grep -E "error:|Error|CMake Error|fatal|not found|No such file" "$log" | grep -v "^ *#" | head -n 8 >&2 || true
      die "$name build failed; the whole log is $log"
    fi
    mkdir -p "$dir" && mv "$tmp"/out/*.whl "$dir"/ && rm -rf "$tmp"
    say "$name: built in $((SECONDS - started)) s, cached in $dir"
  else
    say "$name: using cached wheel $(ls "$dir"/*.whl)"
  fi
  pipq --force-reinstall --no-deps "$dir"/*.whl
  pipq "$dir"/*.whl   # its dependencies, if any are missing
  echo "$key" >"$stamp"
}

# --- 4. Horovod 0.28.1, C++17, PyTorch + Gloo + MPI (+ NCCL when torch has CUDA) ---------------------
# (Build functions run inside `if`, where bash ignores `set -e`: every step checks its own status.)
build_horovod() {
  local work=$1 sdist="$CACHE/src/horovod-$HOROVOD_VERSION.tar.gz" src="$1/horovod-$HOROVOD_VERSION"
  if [ ! -f "$sdist" ] && [ -n "$OFFLINE" ]; then
    mkdir -p "$CACHE/src" && cp "$OFFLINE/horovod-$HOROVOD_VERSION.tar.gz" "$sdist" || return 1
  fi
  [ -f "$sdist" ] || "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
    "horovod==$HOROVOD_VERSION" -d "$CACHE/src" || return 1
  tar xzf "$sdist" -C "$work" || return 1
  # Horovod 0.28.1 compiles as C++14 (torch >= 2.1 headers need C++17) and its CUDA kernels as CUDA C++11
  # (fails with recent host compilers): both become 17; fails if a patch no longer applies.
  "$PY" "$ROOT/tools/install_gpu.py" patch-horovod "$src" || return 1
  command -v cmake >/dev/null 2>&1 || "$PY" -m pip install -q "cmake>=3.13" || return 1
  export PATH="$VENV/bin:$PATH" MAKEFLAGS="-j$(nproc)"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
  if [ -n "$MPICC" ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  # CUDA torch: NCCL GPU operations, nvcc, NCCL and the GPU architectures decided before the build
  [ -z "$HVD_GPU_ENV" ] || eval "$HVD_GPU_ENV"
  "$PY" -m pip wheel --disable-pip-version-check --no-deps --no-build-isolation -v -w "$work/out" "$src"
}
HVD_GPU_ENV=""
HVD_CC=""
HOROVOD_SKIPPED=""
if [ "$TORCH_CUDA" != cpu ]; then
  # When nvcc or NCCL is missing, one line says what Horovod's GPU build needs (not CMake, minutes later);
  # everything else is still installed and the torch engine (DDP on NCCL) works without Horovod.
  if HVD_GPU_ENV=$("$PY" "$ROOT/tools/install_gpu.py" horovod-env --torch-cuda "$TORCH_CUDA" --work "$CACHE/nccl-link"); then
    HVD_CC=$(eval "$HVD_GPU_ENV"; echo "${HOROVOD_BUILD_CUDA_CC_LIST:+-cc$HOROVOD_BUILD_CUDA_CC_LIST}")  # in the cache key
  else
    HOROVOD_SKIPPED=1
    say "Horovod skipped: its GPU build needs the line above fixed; the rest is installed (engine.name: torch works)"
  fi
fi
if [ -z "$HOROVOD_SKIPPED" ]; then
  HVD_KEY="horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-$PY_TAG-$(uname -m)-mpi-$MPI_KEY$HVD_CC"
  cached_wheel horovod "$HVD_KEY" build_horovod
  py_ok "import horovod.torch" || die "horovod.torch does not import; rebuild with: rm -rf $CACHE/wheels/horovod/$HVD_KEY && ./install.sh"
fi

# --- 5. mpi4py against the same MPI --------------------------------------------------------------------
build_mpi4py() {
  MPICC="$MPICC" "$PY" -m pip wheel --disable-pip-version-check --no-deps --no-binary mpi4py -w "$1/out" "mpi4py>=3.1"
}
if [ -n "$MPICC" ]; then cached_wheel mpi4py "mpi4py-$PY_TAG-$(uname -m)-mpi-$MPI_KEY" build_mpi4py; fi

# --- 6. NVIDIA DALI, matching torch's CUDA major (the CPU build of torch uses the CUDA 12 package) -----
case "$TORCH_CUDA" in 13.*) DALI_PKG=nvidia-dali-cuda130 ;; *) DALI_PKG=nvidia-dali-cuda120 ;; esac
if py_ok "import nvidia.dali"; then
  say "keeping $DALI_PKG $("$PY" -c 'import nvidia.dali as d; print(d.__version__)')"
elif [ -n "$OFFLINE" ] && ! ls "$OFFLINE"/nvidia_dali*.whl >/dev/null 2>&1; then
  say "DALI skipped: no $DALI_PKG wheel in $OFFLINE (the DALI checks will say \"skipped: DALI not installed\")"
else
  say "installing $DALI_PKG"
  pipq "$DALI_PKG"
fi

# --- 7. tsm_dist itself (editable) and the rest: pyyaml, wandb, PyAV, numpy, matplotlib, pytest -------
# An editable install follows the source by itself; it is redone only when what pip read changes (the
# package metadata, this checkout, the variant below) or tsm_dist no longer imports from this checkout.
SELF_STAMP="$VENV/.tsm_dist-self.key"
SELF_KEY=$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" 2>/dev/null | sha1sum | cut -c1-10)
SELF_KEY="$SELF_KEY|$ROOT|${HOROVOD_SKIPPED:-hvd}|${MPICC:+mpi}"
if [ -f "$SELF_STAMP" ] && [ "$(cat "$SELF_STAMP")" = "$SELF_KEY" ] &&
   [ "$("$PY" -I -c 'import os, tsm_dist; print(os.path.dirname(os.path.dirname(os.path.realpath(tsm_dist.__file__))))' 2>/dev/null)" = "$(realpath "$ROOT")" ]; then
  say "tsm_dist: already installed (editable, $ROOT; setup.cfg unchanged)"
else
  say "installing tsm_dist (editable) with its dependencies"
  if [ -z "$HOROVOD_SKIPPED" ] && [ -n "$MPICC" ]; then
    pipq --no-build-isolation -e "$ROOT[test]"
  else  # without Horovod or mpi4py: its other dependencies, so that pip does not try to build those two
    mapfile -t DEPS < <("$PY" "$ROOT/tools/install_gpu.py" deps --setup-cfg "$ROOT/setup.cfg")
    pipq --no-build-isolation --no-deps -e "$ROOT"
    pipq "${DEPS[@]}"
  fi
  echo "$SELF_KEY" >"$SELF_STAMP"
fi

# --- 8. the temporal shift's C++ ops (g++ and torch's headers; without them the Python kernels run) ----
# Keyed by their source and this torch, so a rerun after a pull rebuilds them only when either changed.
if "$PY" -m tsm_dist.commands.shift_ops build >"$LOGS/shift-ops.log" 2>&1; then
  say "$(tail -n 1 "$LOGS/shift-ops.log")"
else
  say "shift ops not built, the Python kernels run instead (same results, slower on small models): $LOGS/shift-ops.log"
fi

# --- 9. what was built --------------------------------------------------------------------------------
[ -n "$HOROVOD_SKIPPED" ] || "$VENV/bin/horovodrun" --check-build
"$PY" -m tsm_dist.commands.selfcheck --summary
