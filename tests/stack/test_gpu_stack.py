"""The stack report a GPU node's first command prints: every component on its own, libcuda.so named."""
from __future__ import annotations

import subprocess

from conftest import PYTHON
from tsm_dist.commands.selfcheck import libcuda_problem


def test_missing_unversioned_libcuda_is_named() -> None:
    def only_versioned(name: str) -> object:
        if name == "libcuda.so":
            raise OSError(name)
        return object()

    def no_driver(name: str) -> object:
        raise OSError(name)

    line = libcuda_problem(only_versioned)
    assert line.startswith("libcuda.so (unversioned) not found") and "link" in line
    assert libcuda_problem(no_driver) == "" and libcuda_problem(lambda name: object()) == ""


def test_a_missing_horovod_does_not_hide_dali() -> None:
    code = ("import sys; sys.modules['horovod'] = None; sys.modules['horovod.torch'] = None\n"
            "from tsm_dist.commands.selfcheck import stack_summary; print(stack_summary())")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "horovod not installed" in out.stdout and "DALI 2." in out.stdout
