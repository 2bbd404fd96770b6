#!/usr/bin/env bash
# Stops what workflow/cluster/start_cluster.sh started (slurmd, slurmctld, slurmdbd, munged,
# MariaDB), each by the pid its own pid file names; packages, config and the accounting database
# stay, so start_cluster.sh brings the same cluster back.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "stop_cluster: error: run as root" >&2; exit 1; }

stop() {  # stop <name> <pid file>
    local pid
    pid=$(cat "$2" 2>/dev/null || true)
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        echo "stop_cluster: stopped $1 ($pid)"
    fi
}
stop slurmd /run/slurm/slurmd.pid
stop slurmctld /run/slurm/slurmctld.pid
stop slurmdbd /run/slurm/slurmdbd.pid
stop munged /run/munge/munged.pid
/etc/init.d/mariadb stop > /dev/null
