"""The files the package reads besides its code: the job template (``jobs/``), the configs and machine
profiles (``configs/``) and the per-rank wrappers (``launch/``).

They live at the top of the repository, where users look for them. This package holds symbolic
links to those three folders, so a wheel or a non-editable install carries copies of them as package
data. One rule finds them: :data:`ROOT` is the repository when the package runs from a checkout
(editable install, ``PYTHONPATH``), otherwise the copies installed with the package.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent


def _root() -> Path:
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "jobs" / "job.sh.tmpl").is_file() and (checkout / "tsm_dist" / "package_files").is_dir():
        return checkout
    return PACKAGE_DATA


ROOT = _root()  # also what rendered job scripts export as TSM_DIST_ROOT (launch/rank.sh lives there)
JOB_TEMPLATE = ROOT / "jobs" / "job.sh.tmpl"
CONFIGS = ROOT / "configs"
MACHINES = CONFIGS / "machines"
RANK_WRAPPER = ROOT / "launch" / "rank.sh"
