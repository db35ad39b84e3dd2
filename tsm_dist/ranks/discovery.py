"""Host discovery for ``horovodrun --host-discovery-script`` (elastic training): the hosts of this job's
allocation that may run ranks, as ``host:slots`` lines.

Horovod 0.28.1 (horovod/runner/elastic/discovery.py, driver.py) runs the script once a second on the
launch host, through a shell, and reads every non-empty stdout line as ``host:slots`` (a bare ``host``
gets ``--slots-per-host``). Its first run must succeed or the job stops; later failures are logged and
the previous host set stays. A host that disappears from the output is removed (its ranks are stopped and
the others roll back to the last commit); one that appears is added at the next commit. A host whose rank
failed is blacklisted by horovodrun itself, for good unless ``--blacklist-cooldown-range`` is given.

Sources, first found wins: ``--hosts`` (a fixed list, for runs without a scheduler); Slurm's
``SLURM_JOB_NODELIST`` (slots: ``--slots``, else the job's ``SLURM_TASKS_PER_NODE``); LSF's
``LSB_DJOB_HOSTFILE`` (one line per slot) or ``LSB_MCPU_HOSTS`` (``host count ...``), without the launch
node that Summit-like systems list first (``--lsf-launch-node first``). Hosts named in the exclude file
(``--exclude`` or ``$TSM_DIST_EXCLUDE_HOSTS``: one host or Slurm hostlist per line, ``#`` comments),
which a user or a node health check writes while the job runs, are left out.

Kept to the standard library and :mod:`tsm_dist.ranks.layout`: it starts once a second.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from tsm_dist.ranks.layout import LayoutError, expand_counts, expand_hostlist

EXCLUDE_VAR = "TSM_DIST_EXCLUDE_HOSTS"
LAUNCH_NODE_POLICIES = ("first", "none")


class DiscoveryError(ValueError):
    """The allocation cannot be read; the message names the variable or file."""


def _parse_hosts(text: str) -> list[tuple[str, int]]:
    hosts = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, _, slots = item.partition(":")
        if not name or (slots and not slots.isdigit()):
            raise DiscoveryError(f"--hosts item {item!r}: expected host or host:slots")
        hosts.append((name, int(slots or 1)))
    return hosts


def slurm_hosts(env: Mapping[str, str], slots: int | None) -> list[tuple[str, int]]:
    """The job's nodes in Slurm's order; slots from ``slots`` or the job's tasks per node."""
    try:
        nodes = expand_hostlist(env["SLURM_JOB_NODELIST"])
        if slots is not None:
            return [(n, slots) for n in nodes]
        tasks_var = next((v for v in ("SLURM_TASKS_PER_NODE", "SLURM_JOB_TASKS_PER_NODE") if env.get(v)), None)
        if tasks_var is None:
            return [(n, 1) for n in nodes]
        counts = expand_counts(env[tasks_var])
    except LayoutError as err:
        raise DiscoveryError(str(err)) from None
    if len(counts) != len(nodes):
        raise DiscoveryError(f"{tasks_var}={env[tasks_var]!r} gives counts for {len(counts)} node(s) but "
                             f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r} names {len(nodes)}")
    return list(zip(nodes, counts))


def _lsf_slot_list(env: Mapping[str, str]) -> list[tuple[str, int]]:
    """(host, LSF slots) in allocation order, from the host file or LSB_MCPU_HOSTS."""
    hostfile = env.get("LSB_DJOB_HOSTFILE")
    if hostfile:
        try:
            lines = Path(hostfile).read_text().split()
        except OSError as err:
            raise DiscoveryError(f"LSB_DJOB_HOSTFILE={hostfile}: {err.strerror}") from None
        counts: dict[str, int] = {}
        for host in lines:
            counts[host] = counts.get(host, 0) + 1
        return list(counts.items())
    words = env["LSB_MCPU_HOSTS"].split()
    if len(words) % 2 or not all(w.isdigit() for w in words[1::2]):
        raise DiscoveryError(f"LSB_MCPU_HOSTS={env['LSB_MCPU_HOSTS']!r}: expected 'host count host count ...'")
    return [(h, int(n)) for h, n in zip(words[0::2], words[1::2])]


def lsf_hosts(env: Mapping[str, str], slots: int | None, launch_node: str = "first") -> list[tuple[str, int]]:
    """The job's execution hosts; with ``launch_node='first'`` the first one (Summit's launch node, where the
    batch script runs and no rank may) is left out when other hosts follow it."""
    hosts = _lsf_slot_list(env)
    if launch_node == "first" and len(hosts) > 1:
        hosts = hosts[1:]
    return [(h, slots if slots is not None else n) for h, n in hosts]


def read_exclude(path: str | Path) -> set[str]:
    """Hosts named in an exclude file; a missing file excludes nothing (the usual case)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return set()
    except OSError as err:
        raise DiscoveryError(f"exclude file {path}: {err.strerror}") from None
    excluded: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            excluded.update(expand_hostlist(entry))
        except LayoutError as err:
            raise DiscoveryError(f"exclude file {path} line {lineno}: {err}") from None
    return excluded


def discover(env: Mapping[str, str], *, slots: int | None = None, hosts: str | None = None,
             exclude: str | None = None, launch_node: str = "first") -> list[tuple[str, int]]:
    """(host, slots) that may run ranks now."""
    if slots is not None and slots < 1:
        raise DiscoveryError(f"--slots must be >= 1, got {slots}")
    if hosts:
        found = [(h, slots or n) for h, n in _parse_hosts(hosts)]
    elif env.get("SLURM_JOB_NODELIST"):
        found = slurm_hosts(env, slots)
    elif env.get("LSB_DJOB_HOSTFILE") or env.get("LSB_MCPU_HOSTS"):
        found = lsf_hosts(env, slots, launch_node)
    else:
        raise DiscoveryError("no allocation to read: neither SLURM_JOB_NODELIST (Slurm) nor LSB_DJOB_HOSTFILE / "
                             "LSB_MCPU_HOSTS (LSF) is set; pass --hosts host:slots,...")
    path = exclude or env.get(EXCLUDE_VAR)
    excluded = read_exclude(path) if path else set()
    return [(h, n) for h, n in found if h not in excluded and n > 0]


def unreachable(hosts: Sequence[str], timeout_s: int = 10) -> list[str]:
    """The hosts that horovodrun would start ranks on with ssh (same test as Horovod's gloo_run: the name
    does not resolve to an address of this machine) and that do not accept a non-interactive ssh login."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from horovod.runner.util import network
    from horovod.runner.util.remote import get_ssh_command

    local = network.get_local_host_addresses()

    def refuses(host: str) -> bool:
        if network.resolve_host_address(host) in local:
            return False
        cmd = get_ssh_command("true", host=host, timeout_s=timeout_s).replace("ssh ", "ssh -o BatchMode=yes ", 1)
        return subprocess.run(cmd, shell=True, stdin=subprocess.DEVNULL, capture_output=True).returncode != 0

    with ThreadPoolExecutor(max_workers=16) as pool:  # hundreds of nodes: not one ssh timeout after another
        return [h for h, bad in zip(hosts, pool.map(refuses, hosts)) if bad]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/discover_hosts.sh",
        description="Print the hosts of this Slurm/LSF job that may run ranks, as host:slots lines "
                    "(horovodrun --host-discovery-script).")
    p.add_argument("--slots", type=int, help="ranks per host (default: the job's tasks per node / LSF slots)")
    p.add_argument("--hosts", help="fixed host:slots,... instead of the scheduler's allocation")
    p.add_argument("--exclude", help=f"file of hosts to leave out (default: ${EXCLUDE_VAR})")
    p.add_argument("--lsf-launch-node", choices=LAUNCH_NODE_POLICIES, default="first",
                   help="LSF: 'first' leaves out the first host (Summit's launch node), 'none' keeps every host")
    p.add_argument("--check-ssh", action="store_true",
                   help="instead of printing, check that every host horovodrun would reach by ssh accepts it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        found = discover(os.environ, slots=args.slots, hosts=args.hosts, exclude=args.exclude,
                         launch_node=args.lsf_launch_node)
    except DiscoveryError as err:
        print(f"tsm-dist discover-hosts: error: {err}", file=sys.stderr)
        return 2
    if args.check_ssh:
        bad = unreachable([h for h, _ in found])
        if bad:
            print(f"tsm-dist discover-hosts: error: horovodrun starts ranks with ssh, but {', '.join(bad)} "
                  f"refused a non-interactive ssh login (see docs/launch.md#elastic-training)", file=sys.stderr)
            return 2
        return 0
    sys.stdout.write("".join(f"{h}:{n}\n" for h, n in found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
