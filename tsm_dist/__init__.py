"""tsm_dist: distributed training of TSM and I3D video recognition models on HPC clusters."""

__version__ = "0.1.0"
