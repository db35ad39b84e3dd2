"""Job scripts from the one template: jsrun resource-set arithmetic for 1..256 Summit nodes, Slurm
directives, bad input, the checked-in examples, and the scripts' shell logic (signal forwarding,
requeue or resubmission on exit code 75) run against stand-in srun/jsrun/scontrol/brequeue."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tsm_dist.scheduler.render import (LSF_NODE_CORES, LSF_NODE_GPUS, RenderError, jsrun_layout, main, render_job,
                                    render_template)
from tsm_dist.state.stop_signals import PREEMPTED_EXIT_CODE, TERMINATED_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
EXAMPLES = REPO / "jobs" / "examples"


def jsrun_line(script: str) -> dict[str, str]:
    words = shlex.split(script.split("run_ranks jsrun", 1)[1].split("\\\n", 1)[0])
    return dict(zip(words[0::2], words[1::2]))


def directives(script: str, prefix: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("resource_sets", ["per-gpu", "per-node"])
def test_jsrun_resource_sets_for_1_to_256_nodes(resource_sets: str) -> None:
    for nodes in range(1, 257):
        text = render_job("lsf", nodes, 6, CONFIG, project="ABC123", resource_sets=resource_sets, check_config=False)
        js = {k: int(v.split(":")[-1]) for k, v in jsrun_line(text).items() if k.startswith("--") and
              k != "--smpiargs"}
        rs_per_node = js["--rs_per_host"]
        assert js["--nrs"] == nodes * rs_per_node, nodes
        # every node: all 6 GPUs, all 42 cores, one rank per GPU, each rank bound to 7 packed cores
        assert rs_per_node * js["--gpu_per_rs"] == LSF_NODE_GPUS
        assert rs_per_node * js["--cpu_per_rs"] == LSF_NODE_CORES
        assert js["--nrs"] * js["--tasks_per_rs"] == 6 * nodes
        assert js["--tasks_per_rs"] * js["--bind"] == js["--cpu_per_rs"] and js["--bind"] == 7
        assert f"#BSUB -nnodes {nodes}" in text and "CPUS_PER_RANK=7" in text
    per_gpu = jsrun_layout(1, 6, "per-gpu")
    per_node = jsrun_layout(1, 6, "per-node")
    assert (per_gpu.gpu_per_rs, per_gpu.cpu_per_rs, per_gpu.tasks_per_rs) == (1, 7, 1)
    assert (per_node.gpu_per_rs, per_node.cpu_per_rs, per_node.tasks_per_rs) == (6, 42, 6)


@pytest.mark.parametrize("gpus", range(1, 7))
def test_jsrun_part_of_a_node(gpus: int) -> None:
    js = jsrun_layout(3, gpus, "per-gpu")
    assert (js.nrs, js.rs_per_host, js.gpu_per_rs, js.cpu_per_rs, js.ranks) == (3 * gpus, gpus, 1, 7, 3 * gpus)


def test_lsf_cpu_variant() -> None:
    text = render_job("lsf", 2, 0, CONFIG, project="ABC123", resource_sets="per-node", ranks_per_node=3)
    js = jsrun_line(text)
    assert (js["--nrs"], js["--tasks_per_rs"], js["--cpu_per_rs"], js["--gpu_per_rs"], js["--bind"]) == \
        ("2", "3", "42", "0", "packed:14")
    assert "--gpus none" in text and "--smpiargs" not in text and "-alloc_flags" in text


def test_lsf_directives_and_requeue() -> None:
    text = render_job("lsf", 4, 6, CONFIG, project="ABC123", time="1:30", job_name="tsm4", queue="batch",
                      warn_seconds=150)
    assert directives(text, "#BSUB") == ["-P ABC123", "-J tsm4", "-W 01:30", "-nnodes 4", '-alloc_flags "smt4"',
                                         "-q batch", "-o tsm4.%J.out", "-e tsm4.%J.err", "-wa USR1", "-wt 3"]
    assert 'brequeue "$JOB_ID"' in text and "scontrol" not in text and "#SBATCH" not in text
    assert "--controller mpi" in text and f"PREEMPTED={PREEMPTED_EXIT_CODE}" in text


def test_slurm_gpu_directives() -> None:
    text = render_job("slurm", 4, 8, CONFIG, cpus_per_rank=12, project="acct", queue="gpu", time="04:00",
                      job_name="tsm4x8", accumulate=2, overrides=["train.epochs=3"])
    assert directives(text, "#SBATCH") == [
        "--job-name=tsm4x8", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
        "--time=04:00:00", "--account=acct", "--partition=gpu", "--output=tsm4x8-%j.out", "--open-mode=append",
        "--requeue", "--signal=USR1@180"]
    assert "--mpi=none" in text and "--controller gloo" in text and "--gpus none" not in text
    assert "--resume auto --accumulate 2 --set train.epochs=3" in text
    assert 'scontrol requeue "$JOB_ID"' in text and "brequeue" not in text


def test_slurm_whole_node_when_cpus_are_not_given() -> None:
    text = render_job("slurm", 2, 4, CONFIG, controller="mpi", requeue=False)
    assert "#SBATCH --exclusive" in text and "--cpus-per-task=" not in "".join(directives(text, "#SBATCH"))
    assert "CPUS_PER_RANK=$(( SLURM_CPUS_ON_NODE >= 4 ? SLURM_CPUS_ON_NODE / 4 : 1 ))" in text
    assert "--mpi=pmix" in text and "#SBATCH --no-requeue" in text and "scontrol requeue" not in text


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(scheduler="lsf", nodes=0, gpus_per_node=6, project="P"), "--nodes"),
    (dict(scheduler="slurm", nodes=-1, gpus_per_node=6), "--nodes"),
    (dict(scheduler="lsf", nodes=2, gpus_per_node=6), "--project is required"),
    (dict(scheduler="lsf", nodes=2, gpus_per_node=8, project="P"), "--gpus-per-node 8: an LSF .* has 6 GPUs"),
    (dict(scheduler="lsf", nodes=2, gpus_per_node=4, project="P", resource_sets="per-node"), "per-node takes"),
    (dict(scheduler="lsf", nodes=2, gpus_per_node=0, project="P"), "CPU job"),
    (dict(scheduler="lsf", nodes=2, gpus_per_node=0, project="P", resource_sets="per-node", ranks_per_node=5),
     "does not divide"),
    (dict(scheduler="lsf", nodes=2, gpus_per_node=6, project="P", controller="gloo"), "--controller gloo"),
    (dict(scheduler="lsf", nodes=2, gpus_per_node=6, project="P", cpus_per_rank=4), "--cpus-per-rank"),
    (dict(scheduler="slurm", nodes=2, gpus_per_node=4, ranks_per_node=2), "one rank per GPU"),
    (dict(scheduler="slurm", nodes=2, gpus_per_node=4, time="2h"), "--time '2h'"),
    (dict(scheduler="slurm", nodes=2, gpus_per_node=4, time="00:02"), "warning"),
    (dict(scheduler="slurm", nodes=2, gpus_per_node=4, accumulate=0), "--accumulate"),
    (dict(scheduler="slurm", nodes=2, gpus_per_node=4, env=["NCCL_IB_HCA"]), "--env 'NCCL_IB_HCA'"),
    (dict(scheduler="slurm", nodes=2, gpus_per_node=4, job_name="a b"), "--job-name"),
    (dict(scheduler="pbs", nodes=2, gpus_per_node=4), "--scheduler"),
])
def test_bad_input_names_the_option(kwargs: dict, culprit: str) -> None:
    with pytest.raises(RenderError, match=culprit):
        render_job(config=CONFIG, **kwargs)


def test_config_is_checked_when_rendering(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="no such file"):
        render_job("slurm", 1, 4, str(tmp_path / "missing.yaml"))
    with pytest.raises(RenderError, match="optim.base_lrr"):
        render_job("slurm", 1, 4, CONFIG, overrides=["optim.base_lrr=0.1"])


def test_template_conditions_and_placeholders() -> None:
    template = "always {{a}}\n[x] x only\n[x !y] x not y\n[!x] not x\n[ -n \"$V\" ] && echo shell test line\n"
    assert render_template(template, {"a": 1}, {"x"}) == \
        "always 1\nx only\nx not y\n[ -n \"$V\" ] && echo shell test line\n"
    assert render_template(template, {"a": 1}, {"y"}) == "always 1\nnot x\n[ -n \"$V\" ] && echo shell test line\n"
    with pytest.raises(RenderError, match=r"line 1: unknown placeholder \{\{a\}\}"):
        render_template(template, {}, set())


def test_cli_writes_an_executable_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "job.sbatch"
    assert main(["--scheduler", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--config", CONFIG,
                 "-o", str(out)]) == 0
    assert os.access(out, os.X_OK) and out.read_text().startswith("#!/bin/bash\n#SBATCH")
    assert main(["--scheduler", "lsf", "--nodes", "1", "--gpus-per-node", "6", "--config", CONFIG]) == 2
    assert "--project is required" in capsys.readouterr().err


def test_checked_in_examples_are_what_the_template_renders(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(REPO)  # the examples use repository-relative config paths
    examples = sorted(EXAMPLES.iterdir())
    assert {p.suffix for p in examples} == {".lsf", ".sbatch"} and len(examples) >= 4
    for path in examples:
        text = path.read_text()
        command = re.search(r"^# Rendered by: tsm-dist render-job (.*)$", text, re.M).group(1)
        capsys.readouterr()
        assert main(shlex.split(command)) == 0
        assert capsys.readouterr().out == text, f"{path} is stale: re-render it with the command it records"


def all_variants() -> list[str]:
    return [render_job("lsf", 2, 6, CONFIG, project="P"),
            render_job("lsf", 2, 6, CONFIG, project="P", resource_sets="per-node", requeue=False),
            render_job("lsf", 2, 0, CONFIG, project="P", resource_sets="per-node", ranks_per_node=2),
            render_job("slurm", 2, 4, CONFIG, env=["NCCL_SOCKET_IFNAME=ib0", "X=a b"]),
            render_job("slurm", 1, 0, CONFIG, ranks_per_node=2, cpus_per_rank=1, controller="mpi", requeue=False),
            render_job("slurm", 3, 4, CONFIG, overrides=[*ELASTIC, "engine.elastic_max_ranks=8"]),
            render_job("lsf", 2, 6, CONFIG, project="P", overrides=ELASTIC, requeue=False, network_interface="ib0")]


def test_every_variant_is_valid_bash(tmp_path: Path) -> None:
    for i, text in enumerate(all_variants()):
        script = tmp_path / f"v{i}.sh"
        script.write_text(text)
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{proc.stderr}\n{text}"


# ------------------------------------------------------------------ the scripts' shell logic
# Stand-ins for the scheduler commands: the launcher records its arguments and behaves like ranks
# that finish (exit 0), get preempted (exit 75) or wait for the forwarded USR1 and then exit 75.
LAUNCHER = """#!/bin/bash
echo "$(basename "$0") $*" >> "$CALLS"
case "$BEHAVIOUR" in
  preempted) exit 75 ;;
  report-plan) echo "on-preempt=$TSM_DIST_ON_PREEMPT" >> "$CALLS"; exit 75 ;;
  terminated) exit 143 ;;
  wait-for-term) trap 'echo "got TERM" >> "$CALLS"; exit 143' TERM; touch "$CALLS.ready"
                 for _ in $(seq 200); do sleep 0.05; done; exit 9 ;;
  wait-for-signal) trap 'echo "got USR1" >> "$CALLS"; exit 75' USR1; touch "$CALLS.ready"
                   for _ in $(seq 200); do sleep 0.05; done; exit 9 ;;
  *) exit 0 ;;
esac
"""
RECORDER = '#!/bin/bash\necho "$(basename "$0") $*" >> "$CALLS"\n'


def run_script(tmp_path: Path, text: str, behaviour: str, env: dict[str, str], signal_after_ready: bool = False,
               sig: signal.Signals = signal.SIGUSR1) -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("srun", "jsrun"):
        (bin_dir / name).write_text(LAUNCHER)
    for name in ("scontrol", "brequeue", "sbatch", "bsub"):
        (bin_dir / name).write_text(RECORDER)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    calls = tmp_path / "calls.txt"
    script = tmp_path / "job.sh"
    script.write_text(text)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "BEHAVIOUR": behaviour,
                "HOME": str(tmp_path), **env}
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if signal_after_ready:
        deadline = time.monotonic() + 20
        while not Path(f"{calls}.ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        proc.send_signal(sig)  # LSF's -wa USR1 / Slurm's --signal=B:USR1 / scancel's TERM reach the shell
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, calls.read_text().splitlines() if calls.exists() else [out]


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_CPUS_ON_NODE": "8"}
LSF_ENV = {"LSB_JOBID": "777"}


def test_slurm_script_requeues_on_75(tmp_path: Path) -> None:
    text = render_job("slurm", 2, 4, CONFIG, job_name="t")
    rc, calls = run_script(tmp_path, text, "preempted", SLURM_ENV)
    assert rc == PREEMPTED_EXIT_CODE
    assert calls[0].startswith("srun --nodes=2 --ntasks-per-node=4 --cpus-per-task=2 --mpi=none")
    assert f"{REPO}/launch/rank.sh --controller gloo --cpus-per-rank 2 -- --config {CONFIG}" in calls[0]
    assert calls[1:] == ["scontrol requeue 4242"]
    assert (tmp_path / "runs" / "t").is_dir()


def test_slurm_script_finishes_without_requeue(tmp_path: Path) -> None:
    rc, calls = run_script(tmp_path, render_job("slurm", 2, 4, CONFIG), "completed", SLURM_ENV)
    assert rc == 0 and len(calls) == 1 and calls[0].startswith("srun ")


def test_slurm_script_resubmits_when_asked(tmp_path: Path) -> None:
    rc, calls = run_script(tmp_path, render_job("slurm", 2, 4, CONFIG), "preempted",
                           {**SLURM_ENV, "TSM_DIST_RESUBMIT": "/jobs/again.sbatch"})
    assert rc == PREEMPTED_EXIT_CODE and calls[1:] == ["sbatch /jobs/again.sbatch"]


def test_lsf_script_forwards_the_warning_signal_and_requeues(tmp_path: Path) -> None:
    text = render_job("lsf", 2, 6, CONFIG, project="P")
    rc, calls = run_script(tmp_path, text, "wait-for-signal", LSF_ENV, signal_after_ready=True)
    assert rc == PREEMPTED_EXIT_CODE, calls
    assert calls[0].startswith("jsrun --nrs 12 --rs_per_host 6 --tasks_per_rs 1 --cpu_per_rs 7 --gpu_per_rs 1")
    assert calls[1:] == ["got USR1", "brequeue 777"]


def test_lsf_script_without_requeue_only_reports(tmp_path: Path) -> None:
    text = render_job("lsf", 1, 6, CONFIG, project="P", requeue=False)
    rc, calls = run_script(tmp_path, text, "preempted", LSF_ENV)
    assert rc == PREEMPTED_EXIT_CODE and len(calls) == 1


# ----------------------------------------------------- SIGTERM: checkpoint, exit 143, a cancel sticks
def test_slurm_script_does_not_requeue_after_sigterm(tmp_path: Path) -> None:
    text = render_job("slurm", 2, 4, CONFIG)
    rc, calls = run_script(tmp_path, text, "wait-for-term", SLURM_ENV, signal_after_ready=True, sig=signal.SIGTERM)
    assert rc == TERMINATED_EXIT_CODE == 143, calls
    # forwarded to the ranks; no scontrol requeue, no sbatch (scontrol show: was it a preemption?)
    assert [c for c in calls[1:] if not c.startswith("scontrol show")] == ["got TERM"]


@pytest.mark.parametrize("scheduler, env", [("slurm", SLURM_ENV), ("lsf", LSF_ENV)])
def test_exit_143_is_never_requeued_or_resubmitted(tmp_path: Path, scheduler: str, env: dict[str, str]) -> None:
    text = render_job(scheduler, 1, 4, CONFIG, project="P")
    rc, calls = run_script(tmp_path, text, "terminated", {**env, "TSM_DIST_RESUBMIT": "/jobs/again"})
    assert rc == TERMINATED_EXIT_CODE and len([c for c in calls if not c.startswith("scontrol show")]) == 1, calls


# what scontrol shows of a job that Slurm preempted, and of a cluster that requeues preempted jobs
PREEMPTED_SCONTROL = """#!/bin/bash
echo "$(basename "$0") $*" >> "$CALLS"
case "$1 $2" in
  "show job") echo "JobId=$3 JobState=RUNNING Requeue=1 PreemptEligibleTime=2026-01-01T00:00:00 PreemptTime=2026-01-01T00:01:00" ;;
  "show config") echo "PreemptMode             = ${PREEMPT_MODE}" ;;
esac
"""


@pytest.mark.parametrize("mode, requeued", [("REQUEUE", True), ("CANCEL", False)])
def test_the_last_line_after_a_preemption_says_who_requeues(tmp_path: Path, mode: str, requeued: bool) -> None:
    script = tmp_path / "job.sh"
    script.write_text(render_job("slurm", 1, 4, CONFIG, job_name="t"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", LAUNCHER), ("scontrol", PREEMPTED_SCONTROL), ("sbatch", RECORDER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"), "BEHAVIOUR": "terminated",
           "HOME": str(tmp_path), "PREEMPT_MODE": mode, **SLURM_ENV}
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == TERMINATED_EXIT_CODE
    last = proc.stdout.strip().splitlines()[-1]
    calls = (tmp_path / "calls").read_text()
    if requeued:  # back in the queue: telling the user to resubmit would start a second copy
        assert "preempted by Slurm (PreemptMode=REQUEUE): checkpoint written; requeueing job 4242" in last
        assert "resubmit" not in last and "scontrol requeue 4242" in calls, proc.stdout
    else:
        assert "resubmit to resume from" in last and "scontrol requeue" not in calls, proc.stdout


@pytest.mark.parametrize("requeue, extra, plan", [(True, {}, "requeue"),
                                                  (True, {"TSM_DIST_RESUBMIT": "/jobs/again.sbatch"}, "resubmit"),
                                                  (False, {}, "none")])
def test_script_tells_the_trainer_what_it_will_do(tmp_path: Path, requeue: bool, extra: dict, plan: str) -> None:
    text = render_job("slurm", 1, 4, CONFIG, requeue=requeue)
    rc, calls = run_script(tmp_path, text, "report-plan", {**SLURM_ENV, **extra})
    assert rc == PREEMPTED_EXIT_CODE and calls[1] == f"on-preempt={plan}", calls


# ------------------------------------- the decided exit code: the run's end record, not the launcher's
# srun's stand-in: the tasks run under a real launcher (horovodrun) and the exit status is what srun's manual
# says of its own: the highest of the tasks' codes, 128 + signal for a task that a signal killed. As under the
# template's --kill-on-bad-exit=0, a task's end does not stop the others (each task's wrapper outlives it).
SRUN_OVER_HOROVODRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done  # srun's own options; launch/rank.sh and its arguments follow
codes=$(mktemp -d)
horovodrun -np 2 -H localhost:2 --gloo bash -c \\
  'trap true TERM; "$@" & pid=$!; while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; done
   echo $rc > '"$codes"'/$HOROVOD_RANK' task "$@"
highest=0
for f in "$codes"/*; do code=$(cat "$f"); [ "$code" -gt "$highest" ] && highest=$code; done
exit $highest
"""


def _rank_pids(marker: str, rank: str) -> list[int]:
    """The rank processes (python -m tsm_dist.ranks.start) of ``marker``'s run with HOROVOD_RANK ``rank``."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            environ = (pid_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and b"tsm_dist.ranks.start" in argv and f"HOROVOD_RANK={rank}".encode() in environ:
            found.append(int(pid_dir.name))
    return found


@pytest.mark.multirank
@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_the_code_rank_0_decided(tmp_path: Path) -> None:
    """Rank 1 SIGKILLed mid-run: rank 0 records ``failed``, exit code 1 ("rank 1 was lost"); the launcher
    reports the kill (137). The script acts on the end record's 1, and says so."""
    from conftest import PYTHON, kill_after_first_step, launcher_env
    from tsm_dist.runlog.records import read_records

    workdir = tmp_path / "run"
    tiny = ["data.backend=random", "data.num_samples=64", "data.batch_size=2", "data.crop_size=32",
            "model.width=8", "model.num_frames=2", "train.epochs=50", "log.interval=1", "log.wandb=disabled",
            "log.progress=false", "engine.name=horovod"]
    script = tmp_path / "job.sh"
    script.write_text(render_job("slurm", 1, 0, CONFIG, ranks_per_node=2, cpus_per_rank=1, workdir=str(workdir),
                                 job_name="killed", overrides=tiny, python=PYTHON))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN_OVER_HOROVODRUN)
    (bin_dir / "srun").chmod(0o755)
    env = launcher_env(**SLURM_ENV)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    metrics = workdir / "metrics.jsonl"
    code, output = kill_after_first_step(["bash", str(script)], metrics, lambda: _rank_pids(str(workdir), "1"),
                                         env=env, cwd=tmp_path)
    end = [r for r in read_records(metrics) if r["type"] == "end"]
    assert len(end) == 1 and (end[0]["status"], end[0]["exit_code"]) == ("failed", 1), end
    assert "ranks exited with status 137" in output, output[-3000:]
    assert code == 1, output[-3000:]
    assert "exit code 1, as the end record decided (the launcher's: 137)" in output, output[-3000:]
    assert "rank 1 was lost" in output and "requeue" not in output.split("ranks exited with status")[1]


# ------------------------------------------------------------------ elastic jobs (engine.elastic)
ELASTIC = ["engine.elastic=true"]


def launcher_line(script: str) -> str:
    return next(line for line in script.splitlines() if line.startswith("run_ranks "))


def test_elastic_slurm_script_starts_horovodrun_with_host_discovery() -> None:
    text = render_job("slurm", 3, 4, CONFIG, job_name="el",
                      overrides=[*ELASTIC, "engine.elastic_max_ranks=8", "engine.elastic_min_ranks=4"])
    sbatch = directives(text, "#SBATCH")
    # a failed node must not end the allocation; the time-limit warning goes to this shell, which passes it on
    assert "--no-kill" in sbatch and "--signal=B:USR1@180" in sbatch and "--signal=USR1@180" not in sbatch
    assert launcher_line(text) == ('run_ranks "$TSM_DIST_PYTHON" -m tsm_dist.ranks.elastic_run --gloo -np 8 --min-np 4 '
                                   '--max-np 8 --host-discovery-script "$DISCOVER_HOSTS" \\')
    assert 'DISCOVER_HOSTS="$TSM_DIST_ROOT/launch/discover_hosts.sh --slots 4"' in text
    assert '"$TSM_DIST_ROOT/launch/rank.sh" --controller none --cpus-per-rank "$CPUS_PER_RANK" --' in text
    assert "8 of 12 slot(s) at start, 4 slot(s) spare, never fewer than 4 rank(s)" in text
    assert "run_ranks srun" not in text and "--network-interface" not in text and 'scontrol requeue "$JOB_ID"' in text
    assert "$DISCOVER_HOSTS --check-ssh || exit 2" in text


@pytest.mark.parametrize("settings, nodes, expected", [
    ([], 3, "-np 12 --min-np 12 --max-np 12"),  # 0: the starting world size
    (["engine.elastic_max_ranks=8"], 3, "-np 8 --min-np 8 --max-np 8"),  # one node's slots kept spare
    (["engine.elastic_min_ranks=6"], 3, "-np 12 --min-np 6 --max-np 12"),  # goes on with 6 of 12
    (["engine.elastic_max_ranks=16"], 3, "-np 12 --min-np 12 --max-np 16"),  # more only if hosts are added
    ([], 1, "-np 4 --min-np 4 --max-np 4 --network-interface lo"),  # horovodrun needs 2 hosts to find a NIC
])
def test_elastic_rank_counts(settings: list[str], nodes: int, expected: str) -> None:
    text = render_job("slurm", nodes, 4, CONFIG, overrides=ELASTIC + settings)
    assert f"elastic_run --gloo {expected} --host-discovery-script" in launcher_line(text)


def test_elastic_options_and_refusals() -> None:
    text = render_job("slurm", 2, 4, CONFIG, overrides=ELASTIC, network_interface="ib0",
                      launcher_args="--blacklist-cooldown-range 60 600")
    assert "--gloo -np 8 --min-np 8 --max-np 8 --network-interface ib0 --blacklist-cooldown-range 60 600" in text
    with pytest.raises(RenderError, match=r"engine.elastic_min_ranks=9 exceeds the 8 rank\(s\)"):
        render_job("slurm", 2, 4, CONFIG, overrides=[*ELASTIC, "engine.elastic_min_ranks=9"])
    with pytest.raises(RenderError, match="engine.elastic: bench.allreduce after training needs the fixed"):
        render_job("slurm", 2, 4, CONFIG, overrides=ELASTIC, then_module="bench.allreduce")


def test_elastic_lsf_script() -> None:
    text = render_job("lsf", 2, 6, CONFIG, project="P", overrides=ELASTIC, controller="gloo", network_interface="ib0")
    assert "run_ranks jsrun" not in text and "-wa USR1" in "".join(directives(text, "#BSUB"))
    assert "--gloo -np 12 --min-np 12 --max-np 12 --network-interface ib0 --host-discovery-script" in \
        launcher_line(text)
    assert 'discover_hosts.sh --slots 6"' in text and "--controller none" in text and 'brequeue "$JOB_ID"' in text
    # horovodrun 0.28.1 does not look for an interface under LSF (tsm_dist.ranks.elastic_run)
    with pytest.raises(RenderError, match="engine.elastic on LSF needs --network-interface"):
        render_job("lsf", 2, 6, CONFIG, project="P", overrides=ELASTIC)


def test_elastic_false_renders_the_usual_script() -> None:
    plain = render_job("slurm", 2, 4, CONFIG, job_name="t")
    off = render_job("slurm", 2, 4, CONFIG, job_name="t", overrides=["engine.elastic=false"])
    assert off.replace(" --set engine.elastic=false", "") == plain
    assert "horovodrun" not in plain and "DISCOVER_HOSTS" not in plain and "--no-kill" not in plain


# A stand-in trainer, started by the real per-rank wrapper (tsm_dist.ranks.start) under the real elastic
# horovodrun: it waits for a stop signal, writes rank 0's end record as the trainer does, then stops after
# a checkpoint that takes longer than horovodrun's own 5 s grace.
FAKE_TRAINER = r"""
import os, signal, sys, time
from pathlib import Path
from tsm_dist.runlog.records import MetricsLog, end_record, header_record
workdir = Path(sys.argv[sys.argv.index("--workdir") + 1])
rank = int(os.environ["HOROVOD_RANK"])
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda n, f: got.append(signal.Signals(n).name))
log = MetricsLog(workdir / "metrics.jsonl")
if rank == 0:
    log.write(header_record(config="c", engine="horovod", world_size=int(os.environ["HOROVOD_SIZE"]), local_size=2,
                            model="m", num_frames=1, per_gpu_batch=1, accumulate=1, global_batch=2, params=1))
(workdir / f"ready{rank}").touch()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
with open(os.environ["CALLS"], "a") as calls:
    calls.write(f"rank {rank} got {got[0] if got else 'nothing'}\n")
time.sleep(float(os.environ.get("CHECKPOINT_S", "0")))
code = 75 if got == ["SIGUSR1"] else 143
if rank == 0:
    log.write(end_record(status="preempted" if code == 75 else "terminated", step=1, epoch=0, exit_code=code))
sys.exit(code)
"""


# the allocations the discovery script reads: Slurm's node list; LSF's hosts with Summit's launch node first
ELASTIC_ALLOCATION = {"slurm": {**SLURM_ENV, "SLURM_JOB_NODELIST": "localhost", "SLURM_TASKS_PER_NODE": "2"},
                      "lsf": {**LSF_ENV, "LSB_MCPU_HOSTS": "batch1 1 localhost 42"}}


def _run_elastic_script(tmp_path: Path, sig: signal.Signals, checkpoint_s: float,
                        scheduler: str = "slurm") -> tuple[int, str, list[str]]:
    from conftest import PYTHON, launcher_env

    root = tmp_path / "root"  # TSM_DIST_ROOT: the real discovery script, a rank.sh that runs the stand-in
    (root / "launch").mkdir(parents=True)
    (root / "fake_trainer.py").write_text(FAKE_TRAINER)
    (root / "launch" / "discover_hosts.sh").write_text((REPO / "launch" / "discover_hosts.sh").read_text())
    (root / "launch" / "rank.sh").write_text(
        '#!/bin/bash\nexec "$TSM_DIST_PYTHON" -m tsm_dist.ranks.start --module fake_trainer "$@"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scontrol", "brequeue"):
        (bin_dir / name).write_text(RECORDER)
    for tool in [*(root / "launch").iterdir(), *bin_dir.iterdir()]:
        tool.chmod(0o755)
    workdir, calls = tmp_path / "run", tmp_path / "calls.txt"
    script = tmp_path / "job.sh"
    options = dict(cpus_per_rank=1) if scheduler == "slurm" else dict(project="P", resource_sets="per-node")
    script.write_text(render_job(scheduler, 1, 0, CONFIG, ranks_per_node=2, workdir=str(workdir), overrides=ELASTIC,
                                 python=PYTHON, **options))
    env = launcher_env(**ELASTIC_ALLOCATION[scheduler], TSM_DIST_ROOT=str(root), CALLS=str(calls),
                       CHECKPOINT_S=str(checkpoint_s))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not all((workdir / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.1)
        os.killpg(proc.pid, sig)  # the batch shell and horovodrun, as the scheduler signals them
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.multirank
@pytest.mark.parametrize("scheduler, requeue", [("slurm", "scontrol requeue 4242"), ("lsf", "brequeue 777")])
def test_elastic_script_passes_the_warning_to_the_ranks_and_requeues(tmp_path: Path, scheduler: str,
                                                                     requeue: str) -> None:
    rc, out, calls = _run_elastic_script(tmp_path, signal.SIGUSR1, checkpoint_s=0, scheduler=scheduler)
    assert sorted(calls[:2]) == ["rank 0 got SIGUSR1", "rank 1 got SIGUSR1"], f"{calls}\n{out}"
    assert "elastic: 2 of 2 slot(s) at start, never fewer than 2 rank(s); hosts now: localhost:2 " in out, out
    assert rc == PREEMPTED_EXIT_CODE and calls[2:] == [requeue], f"{calls}\n{out}"
    assert "exit code 75, as the end record decided (the launcher's: 1)" in out, out


@pytest.mark.multirank
def test_elastic_script_gives_the_ranks_more_than_horovodruns_5_s_after_sigterm(tmp_path: Path) -> None:
    """horovodrun itself kills its ranks 5 s after a SIGTERM; the job's launcher leaves them their checkpoint."""
    rc, out, calls = _run_elastic_script(tmp_path, signal.SIGTERM, checkpoint_s=7)
    ranks = [c for c in calls if not c.startswith("scontrol show")]  # (was it a Slurm preemption?)
    assert sorted(ranks) == ["rank 0 got SIGTERM", "rank 1 got SIGTERM"], f"{calls}\n{out}"
    assert "SIGTERM received: the ranks checkpoint and stop by themselves" in out, out
    assert rc == TERMINATED_EXIT_CODE and "terminated at step 1" in out, out
    assert "exit code 143, as the end record decided (the launcher's: 1)" in out and "requeueing" not in out, out
