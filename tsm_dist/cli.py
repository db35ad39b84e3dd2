"""The ``tsm-dist`` command: a thin dispatcher to the module that owns each sub-command.

Every sub-command lives in its own module and exposes ``main(argv: list[str] | None) -> int``;
modules are imported only when their command runs, so ``tsm-dist --help`` stays fast and a
sub-command never pays for another's imports (Horovod, DALI, wandb).
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tsm_dist.commands.demo", "train a small TSM and TSN on the synthetic set with 2 local ranks, compare"),
    "train": ("tsm_dist.training.train", "train a model (start once per rank: horovodrun, mpirun, jsrun, srun)"),
    "eval": ("tsm_dist.training.evaluate", "evaluate checkpoints: 1 clip center crop or K clips x 3 crops"),
    "profile": ("tsm_dist.models.profiler", "MACs, parameters, compute/IO, temporal resolution, throughput"),
    "make-synthetic": ("tsm_dist.data.synthetic", "write the synthetic temporal-order video data set"),
    "convert": ("tsm_dist.data.convert", "convert Kinetics CSV / Something-Something JSON to file lists"),
    "pack": ("tsm_dist.data.pack.write", "pack a file list's videos into large shards + index; --verify a packed set"),
    "render-job": ("tsm_dist.scheduler.render", "render an LSF (jsrun) or Slurm (srun) job script"),
    "sweep": ("tsm_dist.scaling_sweep", "scaling sweep across node counts (= python -m tsm_dist.scaling_sweep)"),
    "batch-study": ("tsm_dist.batch_study", "accuracy vs effective batch (accumulation), SGD vs LARS/LAMB: Table 12"),
    "io-study": ("tsm_dist.io_study", "data time not hidden by compute vs compute, per model and loader"),
    "check": ("tsm_dist.commands.selfcheck", "print the stack (torch, Horovod, MPI, DALI) and run a 2-rank self-check"),
    "check-data": ("tsm_dist.commands.check_data", "probe every video of a config's file lists and print a summary"),
    "import-official": ("tsm_dist.deploy.import_official", "an official TSM checkpoint (model zoo, online demo) as a tsm_dist checkpoint"),
    "export": ("tsm_dist.deploy.export", "a checkpoint as ONNX/TorchScript: online (explicit shift caches) or clip model"),
    "stream": ("tsm_dist.deploy.stream", "stream a video frame by frame through an exported online ONNX model"),
    "early-recognition": ("tsm_dist.deploy.early", "accuracy vs % of the video observed, online model, file list"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: tsm-dist <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'tsm-dist <command> --help' for a command's options; '--debug' (or TSM_DIST_DEBUG=1)",
              "shows the Python traceback of an error. Exit codes: tsm_dist/commands/exit_codes.py, README."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from tsm_dist import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tsm-dist: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from tsm_dist.commands.exit_codes import run_main

    module = importlib.import_module(COMMANDS[name][0])
    # the one edge where an exception becomes an exit code and one line (commands that already run
    # through it, like train and eval, never let one escape)
    return run_main(f"tsm-dist {name}", module.main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
