"""The distributed stack is real: Horovod over Gloo (horovodrun) and over MPI (mpirun, mpi4py comm)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import PYTHON, REPO, VENV_BIN, horovodrun, mpirun, run_bounded

WORKER = str(REPO / "tests" / "workers" / "hvd_stack_worker.py")
pytestmark = pytest.mark.multirank


def _check(result: subprocess.CompletedProcess, controller: str, comm: str = "world") -> None:
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"STACK_OK controller={controller} size=2 comm={comm}" in result.stdout, result.stdout[-4000:]


def test_check_build_lists_pytorch_gloo_and_mpi():
    out = subprocess.run([str(VENV_BIN / "horovodrun"), "--check-build"], capture_output=True, text=True,
                         timeout=60).stdout
    for line in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert line in out, out


def test_two_ranks_through_horovodrun_gloo():
    _check(run_bounded(horovodrun(2, PYTHON, WORKER), timeout=180), "gloo")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")
def test_two_ranks_through_mpirun():
    _check(run_bounded(mpirun(2, PYTHON, WORKER), timeout=180), "mpi")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")
def test_horovod_initialised_on_an_mpi4py_communicator():
    _check(run_bounded(mpirun(2, PYTHON, WORKER, "--mpi4py-comm"), timeout=180), "mpi", "mpi4py")
