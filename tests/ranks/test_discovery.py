"""Host discovery for elastic jobs (launch/discover_hosts.sh): the hosts of a Slurm or LSF allocation under
recorded environments, the exclude file, and the output read back by Horovod's own discovery class."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tsm_dist.ranks.discovery import DiscoveryError, discover, read_exclude

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "discover_hosts.sh"


def test_slurm_nodes_and_tasks_per_node() -> None:
    env = {"SLURM_JOB_NODELIST": "gpu[08-10],login-b", "SLURM_TASKS_PER_NODE": "4(x3),2"}
    assert discover(env) == [("gpu08", 4), ("gpu09", 4), ("gpu10", 4), ("login-b", 2)]
    # the rendered script passes the ranks per node: Slurm's counts do not matter then
    assert discover(env, slots=6) == [("gpu08", 6), ("gpu09", 6), ("gpu10", 6), ("login-b", 6)]
    assert discover({"SLURM_JOB_NODELIST": "n1"}) == [("n1", 1)]


def test_slurm_counts_that_do_not_match_the_nodes_are_refused() -> None:
    with pytest.raises(DiscoveryError, match=r"SLURM_TASKS_PER_NODE='4\(x2\)' gives counts for 2 node\(s\).*names 3"):
        discover({"SLURM_JOB_NODELIST": "gpu[1-3]", "SLURM_TASKS_PER_NODE": "4(x2)"})


def test_lsf_hostfile_without_the_launch_node(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("batch3\n" + "a01n01\n" * 42 + "a01n02\n" * 42)  # Summit: launch node first, 1 slot
    env = {"LSB_DJOB_HOSTFILE": str(hostfile), "LSB_MCPU_HOSTS": "ignored 1"}
    assert discover(env, slots=6) == [("a01n01", 6), ("a01n02", 6)]
    assert discover(env) == [("a01n01", 42), ("a01n02", 42)]
    assert discover(env, slots=6, launch_node="none") == [("batch3", 6), ("a01n01", 6), ("a01n02", 6)]


def test_lsf_mcpu_hosts() -> None:
    env = {"LSB_MCPU_HOSTS": "batch1 1 h1 42 h2 42"}
    assert discover(env, slots=6) == [("h1", 6), ("h2", 6)]
    assert discover({"LSB_MCPU_HOSTS": "h1 42"}, slots=6) == [("h1", 6)]  # the only host is never dropped
    with pytest.raises(DiscoveryError, match="LSB_MCPU_HOSTS='h1 42 h2'"):
        discover({"LSB_MCPU_HOSTS": "h1 42 h2"})
    with pytest.raises(DiscoveryError, match="LSB_DJOB_HOSTFILE=/nonexistent/hosts"):
        discover({"LSB_DJOB_HOSTFILE": "/nonexistent/hosts"})


def test_the_exclude_file_drops_hosts_named_or_in_a_hostlist(tmp_path: Path) -> None:
    exclude = tmp_path / "exclude_hosts"
    assert read_exclude(exclude) == set()  # not written yet: nothing excluded
    exclude.write_text("# written by the health check\ngpu09  # ECC errors\n\nn[2-3]\n")
    assert read_exclude(exclude) == {"gpu09", "n2", "n3"}
    env = {"SLURM_JOB_NODELIST": "gpu[08-10]", "TSM_DIST_EXCLUDE_HOSTS": str(exclude)}
    assert discover(env, slots=2) == [("gpu08", 2), ("gpu10", 2)]
    exclude.write_text("gpu[08-10\n")
    with pytest.raises(DiscoveryError, match=r"exclude_hosts line 1: unbalanced brackets"):
        discover(env, slots=2)


def test_fixed_hosts_and_bad_input() -> None:
    assert discover({}, hosts="localhost:2,127.0.0.1") == [("localhost", 2), ("127.0.0.1", 1)]
    with pytest.raises(DiscoveryError, match="neither SLURM_JOB_NODELIST"):
        discover({})
    with pytest.raises(DiscoveryError, match="--hosts item 'a:x'"):
        discover({}, hosts="a:x")
    with pytest.raises(DiscoveryError, match="--slots must be >= 1"):
        discover({"SLURM_JOB_NODELIST": "n1"}, slots=0)


def _script_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LSB_", "TSM_DIST_EXCLUDE"))}
    return {**base, "TSM_DIST_PYTHON": sys.executable, **env}


def test_the_script_is_what_horovodrun_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Horovod's own HostDiscoveryScript (what horovodrun --host-discovery-script uses) runs the script through
    a shell, with its arguments, and reads back every host with its slots."""
    from horovod.runner.elastic.discovery import HostDiscoveryScript

    assert os.access(SCRIPT, os.X_OK)
    exclude = tmp_path / "exclude_hosts"
    exclude.write_text("gpu02\n")
    for key, value in _script_env(SLURM_JOB_NODELIST="gpu[01-03]", SLURM_TASKS_PER_NODE="4(x3)",
                                  TSM_DIST_EXCLUDE_HOSTS=str(exclude)).items():
        monkeypatch.setenv(key, value)
    assert HostDiscoveryScript(f"{SCRIPT} --slots 2", None).find_available_hosts_and_slots() == \
        {"gpu01": 2, "gpu03": 2}
    exclude.write_text("")  # the node came back (or the file was emptied): the host returns
    assert HostDiscoveryScript(str(SCRIPT), None).find_available_hosts_and_slots() == \
        {"gpu01": 4, "gpu02": 4, "gpu03": 4}


def test_the_script_fails_in_one_line_without_an_allocation() -> None:
    proc = subprocess.run([str(SCRIPT)], env=_script_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "error: no allocation to read" in proc.stderr, proc.stderr


def test_check_ssh_names_the_hosts_horovodrun_could_not_reach() -> None:
    """Local names (horovodrun starts those ranks without ssh) pass; a host that does not resolve is named."""
    ok = subprocess.run([str(SCRIPT), "--hosts", "localhost:2,127.0.0.1:1", "--check-ssh"], env=_script_env(),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == "", ok.stderr
    bad = subprocess.run([str(SCRIPT), "--hosts", "localhost:2,tsm-no-such-host.invalid:2", "--check-ssh"],
                         env=_script_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert "but tsm-no-such-host.invalid refused a non-interactive ssh login" in bad.stderr
    assert "localhost" not in bad.stderr.split("but ")[1], bad.stderr
