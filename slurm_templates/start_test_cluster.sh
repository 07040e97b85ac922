#!/usr/bin/env bash
# Start (idempotently) the SLURM test cluster, all on this machine: node <hostname> with
# 4 fake GPUs, and nodes n1, n2 with 2 fake GPUs each (their own slurmd, port and spool).
# Partition "debug" (default) has all three nodes, "multi" only n1 and n2. CPUs are
# oversubscribed (8 per node) so several jobs run at once. Run as root.
# `start_test_cluster.sh stop` shuts it down.
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
for i in 0 1 2 3 4 5 6 7; do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done

H=$(hostname)
CONF=$(cat <<CONFEOF
# Written by slurm_templates/start_test_cluster.sh: a three-node test cluster on one host.
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
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# the nodes declare more CPUs than the host has: jobs share its cores
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2,sched_min_interval=200000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=20
MinJobAge=600
NodeName=$H CPUs=8 RealMemory=16000 Gres=gpu:4 State=UNKNOWN
NodeName=n1 NodeHostname=$H Port=17001 CPUs=8 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
NodeName=n2 NodeHostname=$H Port=17002 CPUs=8 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$H,n1,n2 Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=n1,n2 MaxTime=INFINITE State=UP
CONFEOF
)
# Rewrite the config only when it changed; a running cluster with the same config is left alone.
if [ "$(cat /etc/slurm/slurm.conf 2> /dev/null)" != "$CONF" ]; then
    printf '%s\n' "$CONF" > /etc/slurm/slurm.conf
    printf '%s\n' "NodeName=$H Name=gpu File=/dev/fakegpu[0-3]" \
        "NodeName=n1 Name=gpu File=/dev/fakegpu[4-5]" \
        "NodeName=n2 Name=gpu File=/dev/fakegpu[6-7]" > /etc/slurm/gres.conf
    if running slurmctld || running slurmd; then     # restart: some settings need it
        scontrol shutdown > /dev/null 2>&1 || true
        for _ in $(seq 120); do running slurmctld || running slurmd || break; sleep 0.5; done
    fi
fi
NODES="$H n1 n2"
running slurmctld || slurmctld
for node in $NODES; do
    mkdir -p "/var/spool/slurmd/$node"
    # one slurmd per node name (its pid file is /run/slurmd-<node>.pid)
    pid=$(cat "/run/slurmd-$node.pid" 2> /dev/null || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2> /dev/null; then slurmd -N "$node"; fi
done
for _ in $(seq 40); do
    up=$(sinfo -h -N -o '%N %T' 2> /dev/null | grep -Ec ' (idle|mixed|allocated)$' || true)
    if [ "$up" -ge 3 ]; then
        sinfo
        exit 0
    fi
    # a node left DOWN by an unclean stop (or drained by a test) comes back with a resume
    for node in $NODES; do
        sinfo -h -n "$node" -o '%T' 2> /dev/null | grep -Eq '^(idle|mixed|allocated)' ||
            scontrol update NodeName="$node" State=RESUME 2> /dev/null || true
    done
    sleep 1
done
echo "start_test_cluster.sh: the nodes did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
