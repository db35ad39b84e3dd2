"""install.sh's GPU build logic (tools/install_gpu.py) on a CPU machine: a fake nvidia-nccl wheel
layout, fake nvcc / nvidia-smi on a fake PATH, and Horovod's real sources for the patches."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "tools" / "install_gpu.py"
SDIST = Path(os.environ.get("TSM_DIST_CACHE", Path.home() / ".cache" / "tsm_dist")) / "src" / "horovod-0.28.1.tar.gz"

spec = importlib.util.spec_from_file_location("install_gpu", HELPER)
install_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_gpu)


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake(tmp_path: Path):
    """site/: the nvidia-nccl wheel's layout (no __init__.py anywhere: a namespace package); cuda/bin/nvcc;
    smi/nvidia-smi reporting two GPU types."""
    site = tmp_path / "site"
    (site / "nvidia" / "nccl" / "include").mkdir(parents=True)
    (site / "nvidia" / "nccl" / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n")
    (site / "nvidia" / "nccl" / "lib").mkdir()
    (site / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_bytes(b"\x7fELF")
    _script(tmp_path / "cuda" / "bin" / "nvcc",
            'echo "nvcc: NVIDIA (R) Cuda compiler driver"; echo "Cuda compilation tools, release 12.4, V12.4.131"\n')
    (tmp_path / "cuda" / "include").mkdir()
    (tmp_path / "cuda" / "include" / "cuda_runtime.h").write_text("")
    _script(tmp_path / "smi" / "nvidia-smi", 'printf "9.0\\n8.0\\n9.0\\n"\n')
    return tmp_path


def _env(fake: Path, path_dirs: list[Path], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "HOROVOD_CUDA_HOME", "HOROVOD_NCCL_HOME", "HOROVOD_NCCL_INCLUDE",
                        "HOROVOD_BUILD_CUDA_CC_LIST")}
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])
    env["PYTHONPATH"] = str(fake / "site")
    env.update(extra)
    return env


def _helper(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_nccl_wheel_is_a_namespace_package_without_file(fake):
    """Why the old `os.path.dirname(nvidia.nccl.__file__)` found nothing."""
    code = "import nvidia.nccl as n; print(n.__file__, list(n.__path__))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(fake, []), capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.startswith("None [") and str(fake / "site" / "nvidia" / "nccl") in out.stdout


def test_horovod_env_finds_nvcc_on_path_nccl_by_package_path_and_the_gpus_architectures(fake):
    env = _env(fake, [fake / "cuda" / "bin", fake / "smi"])
    out = _helper(env, "horovod-env", "--torch-cuda", "12.4", "--work", str(fake / "work"))
    assert out.returncode == 0, out.stderr
    # evaluated as install.sh does
    shown = subprocess.run(["bash", "-c", out.stdout + 'echo "$HOROVOD_GPU_OPERATIONS|$HOROVOD_CUDA_HOME|'
                            '$HOROVOD_NCCL_INCLUDE|$HOROVOD_NCCL_LIB|$HOROVOD_NCCL_LINK|$HOROVOD_BUILD_CUDA_CC_LIST"'],
                           capture_output=True, text=True, timeout=60).stdout.strip().split("|")
    nccl = fake / "site" / "nvidia" / "nccl"
    assert shown == ["NCCL", str(fake / "cuda"), str(nccl / "include"), str(fake / "work" / "nccl-lib"), "SHARED",
                     "80,90"]
    link = fake / "work" / "nccl-lib" / "libnccl.so"  # what CMake's find_library(nccl) looks for
    assert link.resolve() == (nccl / "lib" / "libnccl.so.2").resolve()
    assert "release 12.4" in out.stderr and "nvidia-smi" in out.stderr


def test_an_nvcc_wrapper_script_is_asked_for_its_toolkit(fake):
    """As on this machine: /usr/local/bin/nvcc is a script that execs /usr/local/cuda-13.0/bin/nvcc, so the
    toolkit is not the script's parent directory."""
    _script(fake / "wrap" / "bin" / "nvcc", f'exec {fake / "cuda" / "bin" / "nvcc"} "$@"\n'
            f'# --dryrun prints its home\n')
    _script(fake / "cuda" / "bin" / "nvcc",
            'case "$*" in *--dryrun*) echo "#$ _HERE_=' + str(fake / "cuda" / "bin") + '" >&2;; '
            '*) echo "Cuda compilation tools, release 12.4, V12.4.131";; esac\n')
    out = _helper(_env(fake, [fake / "wrap" / "bin", fake / "smi"]), "horovod-env", "--torch-cuda", "12.4",
                  "--work", str(fake / "work"))
    assert out.returncode == 0, out.stderr
    assert f"export HOROVOD_CUDA_HOME={fake / 'cuda'}\n" in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_the_real_nvcc_of_this_machine_is_found_with_its_toolkit(fake):
    real = Path(shutil.which("nvcc")).parent
    out = _helper(_env(fake, [real, fake / "smi"]), "horovod-env", "--torch-cuda", "13.0", "--work",
                  str(fake / "work"))
    assert out.returncode == 0, out.stderr
    home = Path(next(line for line in out.stdout.splitlines() if line.startswith("export CUDA_HOME="))
                .split("=", 1)[1].strip("'"))
    assert (home / "include" / "cuda_runtime.h").is_file() and (home / "bin" / "nvcc").exists()
    assert "release " in out.stderr


def test_cuda_home_wins_over_path_and_must_hold_nvcc(fake):
    env = _env(fake, [fake / "smi"], CUDA_HOME=str(fake / "cuda"))
    out = _helper(env, "horovod-env", "--torch-cuda", "12.4", "--work", str(fake / "work"))
    assert out.returncode == 0 and f"export HOROVOD_CUDA_HOME={fake / 'cuda'}" in out.stdout
    env = _env(fake, [fake / "cuda" / "bin"], CUDA_HOME=str(fake / "smi"))
    out = _helper(env, "horovod-env", "--torch-cuda", "12.4", "--work", str(fake / "work"))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (f"[install] ERROR: CUDA_HOME={fake / 'smi'} has no bin/nvcc: point CUDA_HOME at a "
                                  "CUDA toolkit (CUDA 12.4 matches torch) or unset it")


def test_missing_nvcc_stops_with_one_line_saying_what_to_load(fake):
    out = _helper(_env(fake, [fake / "smi"]), "horovod-env", "--torch-cuda", "12.4", "--work", str(fake / "work"))
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nvcc is not on PATH and CUDA_HOME is not set" in lines[0]
    assert "module load cuda/12.4" in lines[0] and "Traceback" not in out.stderr


def test_missing_nccl_wheel_stops_with_one_line(fake, tmp_path):
    env = _env(fake, [fake / "cuda" / "bin"], PYTHONPATH=str(tmp_path / "empty"))
    out = _helper(env, "horovod-env", "--torch-cuda", "12.4", "--work", str(fake / "work"))
    assert out.returncode == 1
    assert "NCCL was not found" in out.stderr and "nvidia-nccl-cu12" in out.stderr
    out = _helper({**env, "HOROVOD_NCCL_HOME": "/opt/nccl"}, "horovod-env", "--torch-cuda", "12.4", "--work",
                  str(fake / "work"))
    assert out.returncode == 0 and "HOROVOD_NCCL_INCLUDE" not in out.stdout  # the user's NCCL, left to CMake


def test_architectures_set_by_the_user_are_kept(fake):
    env = _env(fake, [fake / "cuda" / "bin", fake / "smi"], HOROVOD_BUILD_CUDA_CC_LIST="70")
    out = _helper(env, "horovod-env", "--torch-cuda", "12.4", "--work", str(fake / "work"))
    assert "export HOROVOD_BUILD_CUDA_CC_LIST=70\n" in out.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="the helper runs this venv's torch, which is a CUDA "
                    "build here: its GPUs or architectures are found (test_architecture_sources_in_order covers it)")
def test_no_architecture_found_means_all(fake):
    out = _helper(_env(fake, [fake / "cuda" / "bin"]), "horovod-env", "--torch-cuda", "12.4", "--work",
                  str(fake / "work"))  # CPU torch, no nvidia-smi: nothing to go by
    assert out.returncode == 0 and "HOROVOD_BUILD_CUDA_CC_LIST" not in out.stdout
    assert "CUDA architectures: all" in out.stderr


def test_architecture_sources_in_order():
    cc = install_gpu.cuda_cc_list
    assert cc({"PATH": ""}, torch_caps=lambda: [(8, 0), (7, 0), (8, 0)], arch_list=lambda: [(9, 0)]) == \
        ("70,80", "the GPUs torch sees")
    assert cc({"PATH": ""}, torch_caps=list, arch_list=lambda: [(9, 0), (10, 0)])[0] == "90,100"


def test_nvcc_of_another_major_than_torch_is_a_warning(fake):
    out = _helper(_env(fake, [fake / "cuda" / "bin", fake / "smi"]), "horovod-env", "--torch-cuda", "13.0",
                  "--work", str(fake / "work"))
    assert out.returncode == 0 and "WARNING: nvcc is CUDA 12.4 but torch is built with CUDA 13.0" in out.stderr


@pytest.mark.skipif(not SDIST.is_file(), reason=f"no Horovod source package at {SDIST} (install.sh downloads it)")
def test_patches_apply_to_horovods_real_sources_once(tmp_path):
    with tarfile.open(SDIST) as tar:
        tar.extractall(tmp_path, filter="data")
    src = tmp_path / "horovod-0.28.1"
    done = install_gpu.patch_horovod(str(src))
    assert len(done) == 4
    assert "set(CMAKE_CUDA_STANDARD 17)" in (src / "horovod/common/ops/cuda/CMakeLists.txt").read_text()
    for name in ("CMakeLists.txt", "horovod/torch/CMakeLists.txt", "horovod/common/ops/cuda/CMakeLists.txt"):
        text = (src / name).read_text()
        assert "CMAKE_CXX_STANDARD 14" not in text and "CMAKE_CUDA_STANDARD 11" not in text
    assert install_gpu.patch_horovod(str(src)) == []  # idempotent: a re-run patches nothing and does not fail


def test_patch_refuses_sources_it_does_not_know(tmp_path):
    (tmp_path / "CMakeLists.txt").write_text("set(CMAKE_CXX_STANDARD 20)\n")
    out = subprocess.run([sys.executable, str(HELPER), "patch-horovod", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "cannot patch" in out.stderr and "CMAKE_CXX_STANDARD 14" in out.stderr


def _fake_cuda_venv(tmp: Path) -> tuple[Path, Path]:
    """A venv whose python is the real one with pip disabled (nothing gets installed) and a fake torch
    that says it is built with CUDA 12.4 for sm_80 and sm_90 (no GPU visible)."""
    venv = tmp / "venv"
    _script(venv / "bin" / "python", 'case "$*" in *"-m pip"*) echo "pip is disabled in this test" >&2; exit 1;; esac\n'
            f'exec {sys.executable} "$@"\n')
    torch_site = tmp / "torch_site" / "torch"
    torch_site.mkdir(parents=True)
    (torch_site / "__init__.py").write_text(
        '__version__ = "2.5.1+cu124"\n'
        "class version:\n    cuda = '12.4'\n"
        "class cuda:\n    is_available = staticmethod(lambda: False)\n"
        "    get_arch_list = staticmethod(lambda: ['sm_80', 'sm_90'])\n")
    return venv, tmp / "torch_site"


def _install_sh(fake: Path, path_dirs: list[Path]) -> subprocess.CompletedProcess:
    venv, torch_site = _fake_cuda_venv(fake)
    env = _env(fake, path_dirs, TSM_DIST_VENV=str(venv), TSM_DIST_CACHE=str(fake / "cache"),
               PYTHONPATH=f"{torch_site}{os.pathsep}{fake / 'site'}")
    return subprocess.run(["bash", str(REPO / "install.sh")], env=env, capture_output=True, text=True, timeout=300)


def _recording_venv(tmp: Path) -> tuple[Path, Path, Path]:
    """A venv whose python runs without site-packages (only the fake CUDA torch and this checkout import)
    and whose pip only records its arguments and the index settings it was given, then succeeds."""
    venv, torch_site = _fake_cuda_venv(tmp)
    log = tmp / "pip.log"
    _script(venv / "bin" / "python",
            f'case "$*" in *"-m pip"*) echo "no_index=$PIP_NO_INDEX find_links=$PIP_FIND_LINKS args=$*" >> {log}; '
            f'exit 0;; esac\nexec {sys.executable} -S "$@"\n')
    (torch_site / "torch" / "__init__.py").write_text(
        (torch_site / "torch" / "__init__.py").read_text() + "    device_count = staticmethod(lambda: 0)\n")
    return venv, torch_site, log


def test_offline_install_with_cuda_torch_and_no_nvcc_installs_the_rest(fake, tmp_path):
    """An air-gapped node: CUDA torch, no nvcc, no MPI, a wheelhouse without DALI. Horovod is skipped with the
    one line its GPU build needs; tsm_dist and its plain dependencies are installed from the wheelhouse only."""
    venv, torch_site, log = _recording_venv(fake)
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    env = _env(fake, [], TSM_DIST_VENV=str(venv), TSM_DIST_CACHE=str(fake / "cache"), TSM_DIST_NO_MPI="1",
               PYTHONPATH=f"{torch_site}{os.pathsep}{REPO}")
    out = subprocess.run(["bash", str(REPO / "install.sh"), "--offline", str(wheelhouse)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "nvcc is not on PATH and CUDA_HOME is not set" in out.stderr and "module load cuda/12.4" in out.stderr
    assert "Horovod skipped" in out.stdout and "building wheel" not in out.stdout
    assert f"DALI skipped: no nvidia-dali-cuda120 wheel in {wheelhouse}" in out.stdout
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith(f"no_index=1 find_links={wheelhouse} ") for c in calls)
    assert any("--no-deps -e" in c for c in calls)
    deps = next(c for c in calls if "wandb" in c)
    assert "horovod" not in deps and "mpi4py" not in deps and "torch" not in deps
    assert "tsm_dist stack: torch 2.5.1+cu124" in out.stdout and "horovod not installed" in out.stdout


def test_plain_dependencies_leave_out_what_the_node_builds():
    deps = install_gpu.plain_dependencies(str(REPO / "setup.cfg"))
    assert "wandb" in deps and any(d.startswith("pytest") for d in deps)
    assert not [d for d in deps if d.split(">")[0].split("=")[0] in ("torch", "horovod", "mpi4py")]


@pytest.mark.skipif(shutil.which("mpicc", path="/usr/bin:/bin") is None, reason="install.sh needs an MPI (mpicc)")
def test_install_sh_with_cuda_torch_keys_the_horovod_wheel_by_the_architectures(fake):
    """nvcc and the NCCL wheel present, no GPU: torch's architectures become the CC list and part of the
    wheel cache key; a wheel cached under that key is taken (pip is disabled, so the install ends there)."""
    import hashlib

    mpicc = shutil.which("mpicc", path="/usr/bin:/bin")
    flavour = subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                             env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
                             ).stdout.splitlines()[0]
    mpi_key = hashlib.sha1(f"{mpicc}|{flavour}".encode()).hexdigest()[:10]
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    key = f"horovod-0.28.1-torch-2.5.1+cu124-{tag}-{os.uname().machine}-mpi-{mpi_key}-cc80,90"
    wheel = fake / "cache" / "wheels" / "horovod" / key / f"horovod-0.28.1-{tag}-{tag}-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    out = _install_sh(fake, [fake / "cuda" / "bin"])
    assert f"horovod: using cached wheel {wheel}" in out.stdout, out.stdout + out.stderr
    assert "CUDA architectures: 80,90 (torch's own CUDA architectures" in out.stderr
    assert "pip is disabled in this test" in out.stderr and out.returncode == 1
