"""A throw-away single-host Slurm cluster for the job-script tests.

The tests must exercise real ``sbatch``/``srun``/``scancel``/``scontrol requeue``, so this module
provisions Debian's ``slurm-wlm`` and ``munge`` (only when missing, only as root with apt-get) and
runs munged, slurmctld and slurmd with every file (key, sockets, state, logs, slurm.conf) inside a
temporary directory: nothing under /etc is changed and stopping the daemons leaves no trace.
Client commands find the cluster through ``SLURM_CONF``, which sbatch also exports into the jobs,
so ``srun`` inside a batch script talks to the same controller.
"""
from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from conftest import _TAG, _kill_tagged, free_port

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
# accounting (sacct), as operators have it: slurmdbd on a MariaDB database
ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
ACCOUNTING_BINARIES = ("slurmdbd", "mariadbd", "mariadb-install-db", "sacct")
NODE = "localhost"  # resolvable everywhere, so ranks can reach the rendezvous on "node 0"
# Several nodes on this host: one slurmd per node name, each on its own port (Slurm refuses a second node
# beside "localhost", which it takes for this host's name, so these names are made up and do not resolve;
# the jobs get the rendezvous address instead, as on a site whose node names do not resolve)
EMULATED_NODE = "tsmnode{}"
PARTITION = "debug"
URGENT = "urgent"  # with preempt_requeue: a higher-priority partition on the same nodes
# job states after which a job will not run again by itself
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _missing_binaries(binaries: tuple[str, ...] = DAEMONS + CLIENTS) -> list[str]:
    return [b for b in binaries if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(timeout_s: float = 900, accounting: bool = False) -> str | None:
    """Install slurm-wlm and munge (and, for ``accounting``, slurmdbd and MariaDB) when missing; return None
    when ready, else why the tests must skip."""
    binaries = DAEMONS + CLIENTS + (ACCOUNTING_BINARIES if accounting else ())
    packages = PACKAGES + (ACCOUNTING_PACKAGES if accounting else ())
    if not _missing_binaries(binaries):
        return None
    if os.geteuid() != 0:
        return f"Slurm binaries {_missing_binaries(binaries)} missing and not root, cannot apt-get install {packages}"
    if shutil.which("apt-get") is None:
        return f"Slurm binaries {_missing_binaries(binaries)} missing and no apt-get to install {packages}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:  # a stale package index is the usual cause; refresh once
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout_s)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"'{' '.join(cmd)}' did not finish within {timeout_s:.0f} s"
    if proc.returncode != 0:
        return f"'{' '.join(cmd)}' failed (rc={proc.returncode}): {proc.stderr.strip()[-500:]}"
    missing = _missing_binaries(binaries)
    return f"installed {packages} but {missing} still missing" if missing else None


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost with ``cpus`` CPUs, all state under ``root``.

    ``nodes`` > 1: that many nodes of ``cpus`` CPUs each, every one a slurmd on this host (their CPUs are
    declared, not real: the jobs of the tests are small)."""

    def __init__(self, root: Path, cpus: int = 2, nodes: int = 1, preempt_requeue: bool = False,
                 accounting: bool = False, node_names: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.preempt_requeue = preempt_requeue
        self.accounting = accounting  # slurmdbd on a MariaDB server of its own (sacct)
        self.dbd_port = 0
        self.cpus = cpus
        self.nodes = [NODE] if nodes == 1 else [EMULATED_NODE.format(i) for i in range(nodes)]
        if node_names:  # names that resolve to this host (elastic tests: horovodrun starts those ranks without ssh)
            self.nodes = list(node_names)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self._procs: dict[str, subprocess.Popen] = {}
        self.tag = uuid.uuid4().hex  # inherited by the daemons and every job process, for the teardown

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and, through sbatch's export, for the jobs)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf), **{_TAG: self.tag})
        if len(self.nodes) > 1:
            env["TSM_DIST_RENDEZVOUS_ADDR"] = "127.0.0.1"  # tsm_dist.ranks.rendezvous.ADDR_VAR
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":  # a test started inside some other allocation must not leak it
                del env[key]
        return env

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = free_port(), free_port()
        r = self.root
        # a preempted job gets SIGTERM and GraceTime before SIGKILL (without it, Slurm kills the batch
        # script along with the ranks within KillWait, before the script can say anything)
        grace = " GraceTime=30" if self.preempt_requeue else ""
        node_lines = "\n".join(
            f"NodeName={name}" + (f" NodeHostname={name} Port={free_port()}" if len(self.nodes) > 1 else "")
            + f" NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN" for name in self.nodes)
        self.conf.write_text(f"""\
ClusterName=tsmtest
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# containers rarely allow cgroups; linuxproc tracks job processes through /proc instead
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmdParameters=config_overrides
{self._accounting_lines()}
JobCompType=jobcomp/none
MinJobAge=600
# job ids (and so the ranks' rendezvous ports, derived from them) differ between clusters that run side by side
FirstJobId={random.randrange(1000, 1_000_000)}
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
{node_lines}
PartitionName={PARTITION} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP{grace}
""")
        if self.preempt_requeue:  # a job in URGENT preempts the debug partition's jobs, which Slurm requeues
            nodes = ",".join(self.nodes)
            with self.conf.open("a") as conf:
                conf.write(f"PreemptType=preempt/partition_prio\nPreemptMode=REQUEUE\n"
                           f"PartitionName={URGENT} Nodes={nodes} PriorityTier=2 MaxTime=INFINITE State=UP\n")

    def _accounting_lines(self) -> str:
        if not self.accounting:
            return "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none"
        self.dbd_port = free_port()
        return (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost={NODE}\n"
                f"AccountingStoragePort={self.dbd_port}\nAccountingStoragePass={self.munge_socket}\n"
                "JobAcctGatherType=jobacct_gather/linux")

    def _start_accounting(self, timeout_s: float) -> None:
        """A MariaDB server (its own data directory, TCP on 127.0.0.1 only, no grant tables) and slurmdbd on
        it; slurmdbd finds slurmdbd.conf beside SLURM_CONF."""
        db, sql_port = self.root / "mysql", free_port()
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"], check=True,
                       capture_output=True, timeout=120)
        self._spawn("mariadbd", ["--no-defaults", f"--datadir={db}", "--user=root", "--bind-address=127.0.0.1",
                                 f"--port={sql_port}", f"--socket={db}/mysqld.sock", "--skip-grant-tables",
                                 f"--pid-file={db}/mysqld.pid", "--innodb-buffer-pool-size=32M"])
        self._wait_for("mariadbd", lambda: _accepts(sql_port), timeout_s)
        conf = self.root / "slurmdbd.conf"
        conf.write_text(f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\nDbdHost={NODE}\n"
                        f"DbdPort={self.dbd_port}\nSlurmUser=root\nStorageType=accounting_storage/mysql\n"
                        f"StorageHost=127.0.0.1\nStoragePort={sql_port}\nStorageUser=root\n"
                        f"StorageLoc=slurm_acct_db\nPidFile={self.root}/slurmdbd.pid\n"
                        f"LogFile={self.root}/log/slurmdbd.log\nDebugLevel=info\n")
        conf.chmod(0o600)
        self._spawn("slurmdbd", ["-D"])
        self._wait_for("slurmdbd", lambda: _accepts(self.dbd_port), timeout_s)
        self._run(["sacctmgr", "-i", "add", "cluster", "tsmtest"], check=False)

    def sacct(self, job_id: int, timeout_s: float = 30) -> dict[str, tuple[str, str]]:
        """What ``sacct`` shows of a job that is over, once slurmdbd has it: {JobID: (State, ExitCode)} for the
        job and its steps (``123``, ``123.batch``, ``123.0``), full width (not the default's ``CANCELLED+``)."""
        deadline, settled = time.monotonic() + timeout_s, None
        while True:
            out = self._run(["sacct", "-j", str(job_id), "-n", "-P", "-o", "JobID,State,ExitCode"]).stdout
            rows = {f[0]: (f[1], f[2]) for f in (line.split("|") for line in out.splitlines()) if len(f) == 3}
            if rows.get(str(job_id), ("",))[0].split(" ")[0] in FINAL_STATES:
                settled = settled or time.monotonic()
            # the steps' records follow the job's (a job cancelled while pending has none)
            if settled and (f"{job_id}.batch" in rows or time.monotonic() > settled + 5) \
                    or time.monotonic() > deadline:
                return rows
            time.sleep(0.5)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self._procs[name] = subprocess.Popen([_daemon(name.split(".")[0]), *args], stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env, start_new_session=True)
        log.close()

    def _wait_for(self, what: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       f"{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s:\n{self.logs()}")

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        self._write_config()
        m = self.root / "munge"
        # munged runs in the foreground so the Popen handle is the daemon itself (clean teardown)
        self._spawn("munged", ["--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--log-file={m / 'munged.log'}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait_for("munged", self.munge_socket.exists, timeout_s)
        if self.accounting:
            self._start_accounting(timeout_s)
        self._spawn("slurmctld", ["-D", "-i", "-f", str(self.conf)])  # -i: ignore state of earlier runs
        self._wait_for("slurmctld", lambda: self._run(["scontrol", "ping"], check=False).returncode == 0,
                       timeout_s)
        for name in self.nodes:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            self._spawn(f"slurmd.{name}", ["-D", "-f", str(self.conf), "-N", name])
        self._wait_for("slurmd", lambda: self.node_state().startswith("IDLE"), timeout_s)
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then kill job processes that outlived them."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run(["scancel", "--full", f"--user={pwd.getpwuid(os.getuid()).pw_name}"], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        # slurmstepd and the job processes run in their own sessions; all of them carry our tag
        _kill_tagged(self.tag)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()  # a daemon that did start must not outlive a failed start
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, cmd: list[str], check: bool = True, timeout_s: float = 30, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout_s, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        """The nodes' state (IDLE, ALLOCATED, ...): the first one's, or "MIXED-STATES: ..." when they differ."""
        states = sorted(set(self._run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.upper().split()))
        return states[0] if len(states) == 1 else f"MIXED-STATES: {' '.join(states)}"

    def sbatch(self, script: Path, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit from ``cwd``; ``env`` is added to what the job inherits (sbatch exports it all)."""
        out = self._run(["sbatch", "--parsable", str(script)], timeout_s=30, cwd=cwd, env=env)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, StdOut, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        fields: dict[str, str] = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: int, until, timeout_s: float) -> dict[str, str]:
        """Poll the job until ``until(fields)`` holds; raise with the job's logs on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            fields = self.job(job_id)
            if until(fields):
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout_s:.0f} s "
                                   f"(reason {fields.get('Reason')}):\n{self.logs()}\n{_stuck(fields)}")
            time.sleep(0.5)

    def wait_final(self, job_id: int, timeout_s: float) -> dict[str, str]:
        return self.wait(job_id, lambda f: f.get("JobState") in FINAL_STATES, timeout_s)

    def release_now(self, job_id: int, timeout_s: float = 60) -> None:
        """Let a requeued job start now instead of after Slurm's requeue delay (BeginTime).

        The delay protects against a real race: slurmd revokes the killed job's credential with a
        one-second timestamp and refuses a relaunch whose credential is not newer ("already killed,
        do not launch batch job"). So wait until the old run has left the node, then one more second.
        """
        self.wait(job_id, lambda f: f.get("JobState") == "PENDING", timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.node_state().startswith("IDLE"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node still {self.node_state()} after the requeue of job {job_id}:\n{self.logs()}")
            time.sleep(0.3)
        time.sleep(2.0)
        self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def scancel(self, job_id: int, signal_name: str | None = None) -> None:
        """``scancel --signal=NAME JOB`` (a signal, the job goes on), or without a name a plain cancel."""
        self._run(["scancel", *([f"--signal={signal_name}"] if signal_name else []), str(job_id)])

    def logs(self, tail_chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")[-tail_chars:]
            parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)


def _stuck(fields: dict[str, str], tail_chars: int = 6000) -> str:
    """A job that did not get where a test waited for: its own output (``StdOut``) and the processes then running
    (jobs stayed RUNNING after a rank was SIGKILLed, twice in many CI runs, with only the daemons' logs kept)."""
    out = Path(fields.get("StdOut", ""))
    text = out.read_text(errors="replace")[-tail_chars:] if out.is_file() else "(none)"
    ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,etime,args", "--forest"], capture_output=True, text=True)
    return f"--- the job's output ({out}) ---\n{text}\n--- processes ---\n{ps.stdout}"


def job_pids(job_id: int | str, env_match: dict[str, str], command: str = "tsm_dist") -> list[int]:
    """Processes of a job whose command line holds ``command`` and whose environment has ``env_match``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            cmd = (proc / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == str(job_id) and command in cmd and \
                all(env.get(k) == v for k, v in env_match.items()):
            pids.append(int(proc.name))
    return pids


def task_pids(job_id: int | str, rank: int) -> list[int]:
    """Python processes of one task of a job (found by the environment srun gave them)."""
    return job_pids(job_id, {"SLURM_PROCID": str(rank)})


def job_log(directory: Path, job_name: str, job_id: int) -> str:
    """A batch job's output (``#SBATCH --output=<name>-%j.out`` in the submit directory)."""
    path = Path(directory) / f"{job_name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def job_records(workdir: Path, kind: str) -> list[dict]:
    """The records of one type in a run's metrics.jsonl ([] before the trainer wrote it)."""
    from tsm_dist.runlog.records import read_records

    path = Path(workdir) / "metrics.jsonl"
    return [r for r in read_records(path) if r["type"] == kind] if path.exists() else []


def _accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def trainer_cluster(root: Path, **options) -> SlurmCluster:
    """A cluster for jobs that run the trainer: skips the test where Slurm cannot be provisioned or Horovod
    is not installed. Use as ``with trainer_cluster(root, nodes=2) as cluster: ...``."""
    import pytest

    reason = ensure_installed(accounting=bool(options.get("accounting")))
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    pytest.importorskip("horovod.torch", reason="the trainer's Horovod engine is not installed")
    return SlurmCluster(root, **options)
