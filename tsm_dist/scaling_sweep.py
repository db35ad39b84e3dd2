"""``python -m tsm_dist.scaling_sweep``: the scaling sweep's documented entry point (``tsm_dist/studies/scaling/sweep.py``)."""
from tsm_dist.studies.scaling.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
