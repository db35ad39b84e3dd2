"""Machine profiles: the shipped YAML files load, bad ones are errors that name the file and key."""
import json

import pytest

from tsm_dist.studies.scaling.machines import list_machines, load_machine


def test_shipped_profiles_load():
    assert {"summit", "localhost", "p100_cluster"} <= set(list_machines())
    summit = load_machine("summit")
    assert (summit.scheduler, summit.gpus_per_node) == ("lsf", 6)
    assert "EDR" in summit.inter_node.name
    assert summit.inter_cost().bandwidth_bytes_per_s == pytest.approx(25e9)
    assert summit.intra_cost().alpha_s == pytest.approx(5e-6)
    assert load_machine("localhost").scheduler == "local"


def _write(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


GOOD = """name: m
scheduler: slurm
gpus_per_node: 4
gpu: x
max_nodes: 2
intra_node: {name: a, latency_us: 1, bandwidth_gb_per_s: 10}
inter_node: {name: b, latency_us: 2, bandwidth_gb_per_s: 5}
"""


def test_profile_from_path(tmp_path):
    assert load_machine(_write(tmp_path, GOOD)).inter_node.bandwidth_gb_per_s == 5


@pytest.mark.parametrize("edit, message", [
    (GOOD + "colour: red\n", "unknown key"),
    (GOOD.replace("max_nodes: 2\n", ""), "missing key"),
    (GOOD.replace("slurm", "pbs"), "scheduler"),
    (GOOD.replace("gpus_per_node: 4", "gpus_per_node: -1"), "gpus_per_node"),
    (GOOD.replace("bandwidth_gb_per_s: 5", "bandwidth_gb_per_s: 0"), "inter_node.bandwidth_gb_per_s"),
    (GOOD.replace("latency_us: 1,", "latency_us: fast,"), "intra_node.latency_us"),
])
def test_bad_profiles_name_file_and_key(tmp_path, edit, message):
    path = _write(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        load_machine(path)
    assert str(path) in str(err.value)


def test_unknown_profile_lists_known():
    with pytest.raises(FileNotFoundError, match="known: .*summit"):
        load_machine("nowhere")


def test_a_cpu_sweep_takes_the_cpu_profile_not_a_gpu_cluster(tmp_path):
    from tsm_dist.studies.scaling.sweep import main as sweep_main

    cpu = load_machine("cpu_nodes")
    assert (cpu.gpus_per_node, cpu.scheduler) == (0, "any")
    assert "placeholder" in cpu.intra_node.name and "unknown network" in cpu.inter_node.name
    base = ["--config", "configs/synthetic_tsm.yaml", "--nodes", "1,2", "--dataset-size", "100", "--dry-run"]
    for scheduler, extra in (("slurm", []), ("lsf", ["--project", "P"])):
        out = tmp_path / scheduler
        assert sweep_main(["--scheduler", scheduler, *base, *extra, "--gpus-per-node", "0", "--out", str(out)]) == 0
        assert json.loads((out / "sweep.json").read_text())["machine"] == "cpu_nodes"
    assert sweep_main(["--scheduler", "slurm", *base, "--out", str(tmp_path / "gpu")]) == 0  # GPUs: as before
    assert json.loads((tmp_path / "gpu" / "sweep.json").read_text())["machine"] == "p100_cluster"


def test_projecting_on_cpu_nodes_is_one_line(capsys):
    from tsm_dist.studies.scaling.sweep import main as sweep_main

    with pytest.raises(SystemExit) as exit_info:
        sweep_main(["project", "--machine", "cpu_nodes", "--step-time", "0.5", "--models", "tsm8f_r50"])
    assert exit_info.value.code == 2 and "CPU nodes (gpus_per_node 0)" in capsys.readouterr().err
