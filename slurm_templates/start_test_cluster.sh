#!/usr/bin/env bash
# Start (idempotently) the single-node SLURM test cluster: this machine, 4 fake GPUs,
# one partition "debug". Run as root. `start_test_cluster.sh stop` shuts it down.
# Needs the Debian packages slurm-wlm and munge (see .ci/run). Used by `make slurm-up`.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "start_test_cluster.sh: run as root (it writes /etc/slurm and starts the daemons)" >&2
    exit 1
fi
for tool in slurmctld slurmd munged sinfo; do
    command -v "$tool" > /dev/null || PATH="$PATH:/usr/sbin"
    command -v "$tool" > /dev/null || { echo "start_test_cluster.sh: $tool not found; apt-get install slurm-wlm munge" >&2; exit 1; }
done

running() { pgrep -x "$1" > /dev/null; }

if [ "${1:-start}" = "stop" ]; then
    running slurmctld && scontrol shutdown || true
    for _ in $(seq 120); do running slurmctld || running slurmd || break; sleep 0.5; done
    if [ -f /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2> /dev/null || true; fi
    echo "test cluster stopped"
    exit 0
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
[ -f /etc/munge/munge.key ] || mungekey --create
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
running munged || su -s /bin/sh munge -c /usr/sbin/munged
for i in 0 1 2 3; do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done

H=$(hostname)
CONF=$(cat <<CONFEOF
# Written by slurm_templates/start_test_cluster.sh: a one-node test cluster.
ClusterName=local
SlurmctldHost=$H
GresTypes=gpu
AuthType=auth/munge
# A requeued job may start again after cred_expire + 1 s (default 120): short, for tests.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2,sched_min_interval=200000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=20
MinJobAge=600
NodeName=$H CPUs=$(nproc) RealMemory=16000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONFEOF
)
# Rewrite the config only when it changed; a running cluster with the same config is left alone.
if [ "$(cat /etc/slurm/slurm.conf 2> /dev/null)" != "$CONF" ]; then
    printf '%s\n' "$CONF" > /etc/slurm/slurm.conf
    echo "NodeName=$H Name=gpu File=/dev/fakegpu[0-3]" > /etc/slurm/gres.conf
    if running slurmctld || running slurmd; then     # restart: some settings need it
        scontrol shutdown > /dev/null 2>&1 || true
        for _ in $(seq 120); do running slurmctld || running slurmd || break; sleep 0.5; done
    fi
fi
running slurmctld || slurmctld
running slurmd || slurmd
for _ in $(seq 30); do
    if sinfo -h -o '%T' 2> /dev/null | grep -Eq '^(idle|mixed|allocated)'; then
        sinfo
        exit 0
    fi
    # a node left DOWN by an unclean stop comes back with an explicit resume
    scontrol update NodeName="$H" State=RESUME 2> /dev/null || true
    sleep 1
done
echo "start_test_cluster.sh: the node did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
