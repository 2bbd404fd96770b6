#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, to try workflow/profiles/slurm without a cluster
# (and for `make test-cluster`). As root on Debian 12: installs Debian's SLURM 22.05 and MUNGE,
# MariaDB and slurmdbd (the executor plugin reads job states with `sacct`, which needs the
# accounting database), writes slurm.conf for localhost (all CPUs, the machine's memory, one
# partition `local`), starts munged, mariadb, slurmdbd, slurmctld and slurmd, registers the cluster,
# an account `wetstone` and the calling user in it, and waits until `sinfo` shows the node idle.
#
#   sudo workflow/cluster/start_cluster.sh        # rerun-safe: running daemons are left running
#
# No systemd needed (containers have none): daemons are started directly and die with the machine.
# Logs: /var/log/slurm/*.log. Stop: workflow/cluster/stop_cluster.sh.
set -euo pipefail

CLUSTER=wetstone
PARTITION=local
ACCOUNT=wetstone
USER_NAME=${SUDO_USER:-$(id -un)}
HOST=$(hostname -s)
CONF=/etc/slurm
WAIT_S=${WAIT_S:-60}

log() { echo "start_cluster: $*"; }
die() { echo "start_cluster: error: $*" >&2; exit 1; }
running() { pgrep -x "$1" > /dev/null; }
wait_for() {  # wait_for <what> <command...>: retry the command for WAIT_S seconds
    local what=$1; shift
    for _ in $(seq "$WAIT_S"); do "$@" > /dev/null 2>&1 && return 0; sleep 1; done
    die "$what did not come up within ${WAIT_S}s (see /var/log/slurm/ and /var/log/mysql/)"
}

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"
[ -r /etc/debian_version ] || die "written for Debian 12 (apt, Debian's slurm-wlm 22.05)"
# never overwrite a SLURM configuration this script did not write (a real cluster's)
for file in "$CONF/slurm.conf" "$CONF/slurmdbd.conf"; do
    [ ! -e "$file" ] || head -n 1 "$file" | grep -q "written by workflow/cluster/start_cluster.sh" \
        || die "$file exists and was not written by this script: not touching a real cluster's configuration"
done

# --- packages -------------------------------------------------------------------------------
PACKAGES="slurm-wlm slurmdbd munge mariadb-server"
installed() { dpkg-query -W -f='${Status}\n' $PACKAGES 2>/dev/null | grep -c "install ok installed"; }
if [ "$(installed)" = 4 ]; then
    log "packages already installed"
else
    log "installing $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $PACKAGES > /tmp/start_cluster_apt.log 2>&1 || {
        apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends $PACKAGES \
            > /tmp/start_cluster_apt.log 2>&1; } || die "apt-get install failed: /tmp/start_cluster_apt.log"
fi

# --- munge: the credential every SLURM daemon and client checks --------------------------------
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
running munged || runuser -u munge -- /usr/sbin/munged
wait_for munged sh -c 'munge -n | unmunge'

# --- slurm.conf: one node (this machine), one partition ----------------------------------------
# CPUs and RealMemory as slurmd itself detects them, so the node never registers as invalid
read -r CPUS MEMORY < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
[ -n "$CPUS" ] || die "slurmd -C did not report CPUs and RealMemory"
cat > "$CONF/slurm.conf" <<EOF
# written by workflow/cluster/start_cluster.sh: a one-node cluster on $HOST
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups: containers rarely delegate them; processes are tracked through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# CPUs and memory are what jobs ask for and get (the executor sends --cpus-per-task and --mem)
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# job states for sacct, which the snakemake executor plugin polls
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# sacct shows the executor's --comment (rule_<name>_wildcards_...): which rule each job ran
AccountingStoreFlags=job_comment
ReturnToService=2
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

# --- accounting: MariaDB + slurmdbd ----------------------------------------------------------
running mariadbd || /etc/init.d/mariadb start > /dev/null
wait_for mariadb mysql -e 'select 1'
install -d -o slurm -g slurm -m 0755 /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /run/slurm
# the database password stays local: kept from an earlier run, else made once
DBPASS=$(sed -n 's/^StoragePass=//p' "$CONF/slurmdbd.conf" 2>/dev/null || true)
[ -n "$DBPASS" ] || DBPASS=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
mysql <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
umask 077
cat > "$CONF/slurmdbd.conf" <<EOF
# written by workflow/cluster/start_cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DBPASS
EOF
umask 022
chown slurm:slurm "$CONF/slurmdbd.conf"
running slurmdbd || slurmdbd
wait_for slurmdbd sacctmgr -n list cluster

# the cluster, an account and the calling user in it (sacct and sbatch -A check these)
sacctmgr -n list cluster format=cluster%40 | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" > /dev/null
sacctmgr -n list account format=account%40 | grep -qw "$ACCOUNT" \
    || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="wetstone jobs" > /dev/null
sacctmgr -n list assoc user="$USER_NAME" account="$ACCOUNT" format=user%40 | grep -qw "$USER_NAME" \
    || sacctmgr -i add user "$USER_NAME" account="$ACCOUNT" cluster="$CLUSTER" > /dev/null

# --- controller and node daemon ---------------------------------------------------------------
if running slurmctld; then scontrol reconfigure; else slurmctld; fi
wait_for slurmctld scontrol ping
running slurmd || slurmd
# a node left down or drained by an earlier run (e.g. the machine restarted under it) comes back
scontrol update nodename="$HOST" state=resume > /dev/null 2>&1 || true
wait_for "node $HOST idle" sh -c "sinfo -h -n '$HOST' -o %T | grep -qx idle"
log "up: $(sinfo -h -o '%P %D %T %c CPUs %m MB')"
