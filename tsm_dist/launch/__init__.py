"""How ranks start: rank layout from the scheduler's environment (layout), per-rank GPU/thread/
communication settings (binding), Horovod's Gloo rendezvous under plain srun (rendezvous), the
per-rank entry point (rank) and the one job-script renderer for LSF and Slurm (render)."""
