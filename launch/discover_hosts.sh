#!/usr/bin/env bash
# horovodrun --host-discovery-script for elastic jobs: prints the hosts of this Slurm/LSF allocation that
# may run ranks, one host:slots line each, minus those in $TSM_DIST_EXCLUDE_HOSTS (a file a user or a
# node health check writes while the job runs). horovodrun runs it once a second on the launch host.
#   usage: launch/discover_hosts.sh [--slots N] [--exclude FILE] [--lsf-launch-node first|none] [--hosts h:n,...]
exec "${TSM_DIST_PYTHON:-python3}" -m tsm_dist.ranks.discovery "$@"
