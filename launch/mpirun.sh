#!/usr/bin/env bash
# Runs N ranks on this host (or on an mpirun hostfile) without a batch scheduler, through the same
# per-rank wrapper the job scripts use.
#   usage: launch/mpirun.sh N [--cpus-per-rank C] -- <trainer args>
#   e.g.   launch/mpirun.sh 2 -- --config configs/synthetic_tsm.yaml --workdir runs/local --resume auto
set -euo pipefail
[ $# -ge 1 ] && [[ "$1" =~ ^[0-9]+$ ]] || { echo "usage: $0 N [wrapper options] -- <trainer args>" >&2; exit 2; }
np=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export TSM_DIST_PYTHON=${TSM_DIST_PYTHON:-$(command -v python3)}
root_args=()
[ "$(id -u)" = 0 ] && root_args=(--allow-run-as-root)
# --bind-to none: the wrapper sizes OMP_NUM_THREADS per rank; mpirun's default core binding would
# pin each rank's threads onto a single core.
exec mpirun "${root_args[@]}" -np "$np" --bind-to none -x TSM_DIST_PYTHON -x PATH "$here/rank.sh" "$@"
