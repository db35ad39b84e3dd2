"""tsm_dist: distributed training of TSM and I3D video recognition models on HPC clusters."""
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _quiet_interrupt(kind, value, tb):  # type: ignore[no-untyped-def]
    """Ctrl-C while a command still imports torch (its first second): one line, not an import traceback.
    Later, :func:`tsm_dist.commands.exit_codes.run_main` and the trainer's stop signals take over."""
    if issubclass(kind, KeyboardInterrupt) and _os.environ.get("TSM_DIST_DEBUG", "") in ("", "0"):
        print("tsm-dist: interrupted", file=_sys.stderr)
        return
    _previous_hook(kind, value, tb)


# only for our commands (python -m tsm_dist.<module> imports this package while argv[0] is still "-m";
# the console script is tsm-dist), never for a program that imports tsm_dist as a library
if _sys.argv and _os.path.basename(_sys.argv[0]) in ("-m", "tsm-dist"):
    _previous_hook = _sys.excepthook
    _sys.excepthook = _quiet_interrupt
