"""The docs run as written (issue 32): every fenced block of README.md and docs/*.md whose info string
carries ``cpu`` (```` ```bash cpu ````) is run, as a new user would, with bash in an empty directory.

The directory holds only links to the checkout's ``configs/`` and its virtual environment (``.venv``), and
PATH does not hold the environment: a bare ``tsm-dist`` fails here as it does after ``./install.sh``, and a
command that writes into the repository root writes into this directory instead. Each block runs with
``set -e``: its first failing line fails the test, named with its file and line.

Only quick blocks are marked (the whole file stays well under 2 minutes on 2 cores); README.md,
"Checking the docs", lists the long ones left unmarked and why.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, launcher_env, run_bounded

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```+)(.*)$")


def marked_blocks(page: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, the block's text) of every block whose info string has the word ``cpu``."""
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if opened:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(opened.group(1))), len(lines))
            if "cpu" in opened.group(2).split():
                blocks.append((i + 1, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


BLOCKS = [(page, line, text) for page in PAGES for line, text in marked_blocks(page)]


def test_the_docs_mark_runnable_blocks_and_the_marking_is_read():
    pages = {page.name for page, _, _ in BLOCKS}
    assert {"README.md", "data.md", "studies.md", "launch.md", "models.md"} <= pages, pages
    sample = "x\n```bash cpu\nls\n```\n```bash\nnot marked\n```\n````text cpu\n```\necho 1\n````\n"
    page = REPO / "tests" / "__doc_sample.md"
    try:
        page.write_text(sample)
        assert marked_blocks(page) == [(2, "ls"), (8, "```\necho 1")]
    finally:
        page.unlink()


@pytest.mark.parametrize("page, line, text", BLOCKS,
                         ids=[f"{page.relative_to(REPO)}:{line}" for page, line, _ in BLOCKS])
def test_a_marked_block_runs_as_written(page, line, text, tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / ".venv").symlink_to(Path(PYTHON).parent.parent)
    env = launcher_env()
    # as after ./install.sh: the environment's tools are not on PATH until it is activated
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != Path(PYTHON).parent)
    env.pop("VIRTUAL_ENV", None)
    # the bound only guards against a hang: on 2 shared cores at load 20 a block's seconds become minutes
    result = run_bounded(["bash", "-e", "-o", "pipefail", "-x", "-c", text], timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"{page.name}:{line}: exit {result.returncode}\n{result.stdout[-3000:]}"


def test_the_study_commands_call_themselves_by_their_documented_name():
    """``tsm-dist sweep --help`` said ``python -m tsm_dist.scaling_sweep`` and ran its example lines together."""
    from tsm_dist.studies.data_io.study import build_parser as io_parser
    from tsm_dist.studies.scaling.sweep import build_parser as sweep_parser

    sweep, io = sweep_parser().format_help(), io_parser().format_help()
    assert sweep.startswith("usage: tsm-dist sweep ") and io.startswith("usage: tsm-dist io-study ")
    assert "configs/tsm8f_r50_kinetics400.yaml \\\n        --nodes 1,2,4,8,16" in sweep
    assert "\n    tsm-dist sweep collect runs/summit\n" in sweep
    assert "configs/tsm8f_r50_kinetics400.yaml \\\n        --models tsm8f_r50" in io
