"""The small shared helpers: a command's whole session ends on a timeout; CSV cells; comma-list types."""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tsm_dist.commands.arguments import choice_list, count_list, name_list
from tsm_dist.commands.processes import find_tool, run_session
from tsm_dist.studies.tables import write_csv


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_timeout_kills_the_launcher_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # a "launcher" that starts a long-lived child, like horovodrun starting ranks
    script = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    lines = []
    with pytest.raises(subprocess.TimeoutExpired):
        run_session([sys.executable, "-c", script], timeout=3, on_line=lines.append)
    assert lines == ["started\n"]
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_exit_code_and_output_file(tmp_path):
    with open(tmp_path / "log", "w") as fh:
        code = run_session([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], timeout=30, stdout=fh)
    assert code == 3 and (tmp_path / "log").read_text() == "hi\n"


def test_find_tool_names_where_it_looked():
    here = Path(sys.executable)
    assert find_tool(here.name) == str(here.parent / here.name)  # this environment's own tools come first
    with pytest.raises(FileNotFoundError, match="no-such-launcher not found \\(looked beside"):
        find_tool("no-such-launcher")


@dataclass
class Row:
    name: str
    value: float = math.nan


def test_csv_nan_is_an_empty_cell(tmp_path):
    write_csv([Row("a", 1.5), Row("b")], Row, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == ["name,value", "a,1.5", "b,"]


def test_comma_lists():
    assert name_list(" a, b,,c ") == ["a", "b", "c"]
    assert choice_list(("x", "y"))("y,x") == ["y", "x"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown \\['z'\\]; choose from x, y"):
        choice_list(("x", "y"))("x,z")
    assert count_list("4,1,2,2") == [1, 2, 4]
    for bad in ("0,1", "1,x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            count_list(bad)
