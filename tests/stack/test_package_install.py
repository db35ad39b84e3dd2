"""A non-editable install carries jobs/, configs/ and launch/ as package data: render a job and read the
machine profiles and the demo's configs from outside the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import json, os, sys
from tsm_dist import package_files
from tsm_dist.commands.demo import configs_dir
from tsm_dist.scheduler.render import render_job
from tsm_dist.studies.scaling.machines import list_machines, load_machine
config = str(configs_dir() / "synthetic_tsm.yaml")
text = render_job("slurm", 2, 4, config, project="P1")  # validates the packaged config too
print(json.dumps({"root": str(package_files.ROOT), "template": str(package_files.JOB_TEMPLATE), "text": text,
                  "machines": list_machines(), "summit_gpus": load_machine("summit").gpus_per_node,
                  "wrapper_x": os.access(package_files.RANK_WRAPPER, os.X_OK), "config": config}))
"""


def test_non_editable_install_renders_jobs_outside_the_repository(tmp_path):
    src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("tsm_dist", "jobs", "configs", "launch"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)  # tsm_dist/package_files: links
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, timeout=300, capture_output=True)
    shutil.rmtree(src)  # nothing may point back at the source tree
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=elsewhere, env={**env, "PYTHONPATH": str(target)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    data = target / "tsm_dist" / "package_files"
    assert found["root"] == str(data) and found["template"] == str(data / "jobs" / "job.sh.tmpl")
    assert not (data / "jobs").is_symlink() and (data / "jobs" / "job.sh.tmpl").is_file()  # copies
    assert f"TSM_DIST_ROOT=${{TSM_DIST_ROOT:-{data}}}" in found["text"] and "#SBATCH --nodes=2" in found["text"]
    assert found["wrapper_x"] and found["config"] == str(data / "configs" / "synthetic_tsm.yaml")
    assert set(found["machines"]) >= {"localhost", "summit"} and found["summit_gpus"] == 6


def test_the_checkout_reads_the_repository_folders():
    from tsm_dist import package_files

    assert package_files.ROOT == REPO and package_files.JOB_TEMPLATE == REPO / "jobs" / "job.sh.tmpl"
    for name in ("jobs", "configs", "launch"):  # the package data are links to the top-level folders
        assert (package_files.PACKAGE_DATA / name).resolve() == REPO / name
