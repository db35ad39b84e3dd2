"""How ranks start: rank layout from the scheduler's environment, per-rank binding and CPU policy, Horovod's Gloo rendezvous under srun, and the per-rank entry point."""
