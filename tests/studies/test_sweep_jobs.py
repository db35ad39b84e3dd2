"""scaling_sweep --dry-run for LSF and Slurm at 1-256 nodes: the planned runs and the rendered job scripts."""
import json
import subprocess

import yaml

from tsm_dist.studies.scaling.sweep import main

NODES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
MODELS = ["tsm8f_r50", "i3d3x3x3_r50", "i3d3x1x1_r50"]
FRAMES = {"tsm8f_r50": 8, "i3d3x3x3_r50": 16, "i3d3x1x1_r50": 32}
# a model swapped in by --models takes its own sampling: the 64-frame window (as the paper's I3D configs)
SAMPLING = {"tsm8f_r50": "segment", "i3d3x3x3_r50": ("dense", 4), "i3d3x1x1_r50": ("dense", 2)}


def dry_run(tmp_path, scheduler, gpus, extra=()):
    out = tmp_path / scheduler
    code = main(["--scheduler", scheduler, "--config", "configs/synthetic_tsm.yaml", "--nodes",
                 ",".join(map(str, NODES)), "--gpus-per-node", str(gpus), "--models", ",".join(MODELS),
                 "--per-gpu-batch", "8", "--steps", "50", "--warmup-steps", "10", "--simulate-nodes", "512,1024",
                 "--dataset-size", "240000", "--epochs", "100", "--out", str(out), "--dry-run", *extra])
    assert code == 0
    return out, json.loads((out / "sweep.json").read_text())


def _script(out, tag, suffix):
    return (out / "jobs" / tag / f"job.{suffix}").read_text()


def test_lsf_dry_run_renders_jsrun_jobs_for_1_to_256_nodes(tmp_path, capsys):
    out, plan = dry_run(tmp_path, "lsf", 6, ["--project", "ABC123", "--time", "00:20"])
    assert plan["machine"] == "summit" and plan["gpus_per_node"] == 6
    assert len(plan["jobs"]) == len(MODELS) * (len(NODES) + 2)
    printed = capsys.readouterr().out
    assert "1024 node(s), 6144 GPU(s), batch 49152 (simulated on 256 nodes, accumulate 4)" in printed
    for model in MODELS:
        for nodes in NODES:
            tag = f"horovod_{model}_n{nodes:04d}"
            text = _script(out, tag, "lsf")
            assert f"#BSUB -nnodes {nodes}\n" in text and "#BSUB -P ABC123" in text and "#BSUB -W 00:20" in text
            # one resource set per GPU: 6 per node, 7 cores each
            assert f"jsrun --nrs {6 * nodes} --rs_per_host 6 --tasks_per_rs 1 --cpu_per_rs 7 --gpu_per_rs 1" in text
            assert f"--workdir \"$WORKDIR\"" in text and f"runs/{tag}" in text
            assert f"# {tag}: {nodes} node(s) x 6 GPU(s)" in text
            # the allreduce microbenchmark follows training on the same allocation, through the same jsrun
            assert text.count(f"jsrun --nrs {6 * nodes} ") == 2
            assert "--module tsm_dist.studies.scaling.allreduce_bench" in text and f"--nodes {nodes} " in text
            cfg = yaml.safe_load((out / "jobs" / tag / f"{tag}.yaml").read_text())
            assert cfg["model"]["name"] == model and cfg["model"]["num_frames"] == FRAMES[model]
            if model == "tsm8f_r50":
                assert cfg["data"]["sampling"] == "segment"
            else:
                assert (cfg["data"]["sampling"], cfg["data"]["stride"]) == SAMPLING[model]
            assert cfg["data"]["batch_size"] == 8 and cfg["train"]["max_steps"] == 60
            assert cfg["train"]["accumulate"] == 1 and cfg["log"]["interval"] == 1
        for nodes, accumulate in ((512, 2), (1024, 4)):
            tag = f"horovod_{model}_n{nodes:04d}_sim"
            text = _script(out, tag, "lsf")
            assert "#BSUB -nnodes 256\n" in text and "--nrs 1536 " in text
            # one channel for accumulation: the run's config, not also the job line
            assert "--accumulate" not in text and "allreduce_bench" not in text
            assert yaml.safe_load((out / "jobs" / tag / f"{tag}.yaml").read_text())["train"]["accumulate"] == accumulate
    # every script is valid bash
    for job in plan["jobs"]:
        subprocess.run(["bash", "-n", str(out / job["script"])], check=True)


def test_slurm_dry_run_renders_srun_jobs_for_both_engines(tmp_path):
    out, plan = dry_run(tmp_path, "slurm", 4, ["--engines", "horovod,torch", "--controller", "mpi"])
    assert plan["machine"] == "p100_cluster"
    assert len(plan["jobs"]) == 2 * len(MODELS) * (len(NODES) + 2)
    for engine in ("horovod", "torch"):
        for nodes in NODES:
            tag = f"{engine}_tsm8f_r50_n{nodes:04d}"
            text = _script(out, tag, "sbatch")
            assert f"#SBATCH --nodes={nodes}\n" in text and "#SBATCH --ntasks-per-node=4" in text
            assert "#SBATCH --gpus-per-node=4" in text
            assert text.count(f"srun --nodes={nodes} --ntasks-per-node=4") == 2
            assert "--mpi=pmix" in text and f"--engine {engine} " in text
            cfg = yaml.safe_load((out / "jobs" / tag / f"{tag}.yaml").read_text())
            assert cfg["engine"]["name"] == engine
        sim = _script(out, f"{engine}_i3d3x1x1_r50_n1024_sim", "sbatch")
        assert "#SBATCH --nodes=256\n" in sim and "--accumulate" not in sim
        sim_cfg = yaml.safe_load((out / "jobs" / f"{engine}_i3d3x1x1_r50_n1024_sim" / f"{engine}_i3d3x1x1_r50_n1024_sim.yaml").read_text())
        assert sim_cfg["train"]["accumulate"] == 4
    for job in plan["jobs"]:
        subprocess.run(["bash", "-n", str(out / job["script"])], check=True)


def test_bad_config_key_names_the_key_before_any_job_is_written(tmp_path, capsys):
    code = main(["--scheduler", "slurm", "--config", "configs/synthetic_tsm.yaml", "--nodes", "1", "--dry-run",
                 "--set", "optim.lr=0.1", "--dataset-size", "10", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "unknown key 'optim.lr'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dry_run_without_the_file_list_uses_the_known_data_set_size_and_says_so(tmp_path, capsys):
    out = tmp_path / "k400"
    argv = ["--scheduler", "slurm", "--nodes", "1,2", "--gpus-per-node", "4", "--dry-run", "--out", str(out)]
    # the paper's Kinetics config: its list is on the cluster, not here
    assert main([*argv, "--config", "configs/tsm8f_r50_kinetics400.yaml"]) == 0
    assert json.loads((out / "sweep.json").read_text())["dataset_size"] == 240_436
    assert "Kinetics-400 training set size, 240,436 clips" in capsys.readouterr().err
    assert main([*argv, "--config", "configs/tsm8f_r50_somethingv2.yaml"]) == 0
    assert json.loads((out / "sweep.json").read_text())["dataset_size"] == 168_913
    # an unknown data set: data.num_samples, said so; without it, one line naming the key and the flag
    base = ["--config", "configs/synthetic_tsm.yaml", "--set", "data.root=/nonexistent"]
    assert main([*argv, *base, "--set", "data.num_samples=5000"]) == 0
    assert json.loads((out / "sweep.json").read_text())["dataset_size"] == 5000
    assert "use data.num_samples, 5,000 clips" in capsys.readouterr().err
    assert main([*argv, *base]) == 2
    assert "pass --dataset-size (or set data.num_samples)" in capsys.readouterr().err


def test_a_measurement_run_keeps_its_ranks_when_the_base_config_is_elastic(tmp_path):
    from tsm_dist.studies.runconfig import measurement_overrides, write_run_config

    base = yaml.safe_load(open("configs/synthetic_tsm.yaml"))
    base.setdefault("engine", {}).update(name="horovod", elastic=True, elastic_min_ranks=2, elastic_max_ranks=8)
    (tmp_path / "elastic.yaml").write_text(yaml.safe_dump(base))
    cfg = write_run_config(tmp_path / "elastic.yaml", "tsm8f_r50", measurement_overrides(12), tmp_path / "run.yaml")
    assert (cfg.engine.elastic, cfg.engine.elastic_min_ranks, cfg.engine.elastic_max_ranks) == (False, 0, 0)
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["engine"]["elastic"] is False
