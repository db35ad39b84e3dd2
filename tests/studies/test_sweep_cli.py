"""scaling_sweep command line: what it refuses, with the reason."""
import pytest

from tsm_dist.studies.scaling.sweep import parse_args

BASE = ["--config", "c.yaml", "--out", "o"]


def test_defaults_and_lists_are_parsed():
    args = parse_args(["--scheduler", "local", "--nodes", "4,1,2,2", *BASE])
    assert args.nodes == [1, 2, 4] and args.engines == ["horovod"] and args.simulate_nodes == []
    args = parse_args(["--scheduler", "lsf", "--nodes", "1,256", "--simulate-nodes", "1024,512", "--project", "P",
                       "--engines", "horovod,torch", "--model-config", "i3d3x1x1_r50=x.yaml", "--dry-run", *BASE])
    assert args.simulate_nodes == [512, 1024] and args.engines == ["horovod", "torch"]
    assert str(args.model_configs["i3d3x1x1_r50"]) == "x.yaml"


@pytest.mark.parametrize("argv, message", [
    (["--scheduler", "local", "--nodes", "1,2", "--simulate-nodes", "3"], "multiple of the largest real count 2"),
    (["--scheduler", "local", "--nodes", "1,4", "--simulate-nodes", "2"], "multiple of the largest real count 4"),
    (["--scheduler", "local", "--nodes", "0,1"], "argument --nodes: counts must be >= 1"),
    (["--scheduler", "local", "--nodes", "1,x"], "comma-separated integers"),
    (["--scheduler", "local", "--nodes", "1", "--engines", "mxnet"], "unknown ['mxnet']"),
    (["--scheduler", "local", "--nodes", "1", "--submit"], "--submit is for lsf/slurm"),
    (["--scheduler", "slurm", "--nodes", "1"], "choose --submit"),
    (["--scheduler", "lsf", "--nodes", "1", "--dry-run"], "needs --project"),
    (["--scheduler", "local", "--nodes", "1", "--steps", "0"], "--steps must be >= 1"),
    (["--scheduler", "local", "--nodes", "1", "--model-config", "x.yaml"], "expected MODEL=CONFIG"),
])
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args([*argv, *BASE])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
