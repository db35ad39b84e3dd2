#!/usr/bin/env bash
# Started once per rank by jsrun / srun / mpirun. Everything rank-specific (layout, GPU, threads,
# Horovod rendezvous) happens in tsm_dist.ranks.start; this file only picks the interpreter, so a site
# can add per-rank module loads here without touching the package.
#   usage: launch/rank.sh [--controller auto|mpi|gloo] [--gpus auto|none] [--cpus-per-rank N] -- <trainer args>
exec "${TSM_DIST_PYTHON:-python3}" -m tsm_dist.ranks.start "$@"
