#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for CI and for trying --executor slurm:
#
#   eval "$(scripts/slurm_local.sh up)"    # prints `export SLURM_CONF=...`; sbatch/squeue/sinfo then use it
#   scripts/slurm_local.sh down            # stops the daemons it started, removes its folder
#
# `up` installs Debian's slurm-wlm and munge when they are missing and it runs as root, writes a minimal
# configuration into a folder of its own (one node: this host, with its CPUs and memory, a job without --mem
# getting its CPUs' share of the memory; one partition,
# `debug`; auth/munge, proctrack/linuxproc, task/none, select/cons_tres; no accounting database), starts
# munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle. It exits 3 when Slurm cannot
# be installed or started here (not root, no apt-get, a daemon that does not come up), so that callers can
# skip rather than fail. `down` stops the daemons by the PIDs `up` recorded. The folder is
# $EXITBENCH_SLURM_DIR (default /tmp/exitbench-slurm); logs are there too. See docs/slurm.md.
set -euo pipefail
dir="${EXITBENCH_SLURM_DIR:-/tmp/exitbench-slurm}"
say() { echo "[slurm_local] $*" >&2; }

down() {
    [ -d "$dir" ] || return 0
    for name in slurmd slurmctld munged; do
        pid="$(cat "$dir/$name.pid" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    # job steps slurmd started (a task still running when the cluster stops) go with it, unless another
    # cluster's slurmd runs here (their steps cannot be told apart)
    pgrep -x slurmd >/dev/null || pkill -f "slurmstepd: \[" 2>/dev/null || true
    rm -rf "$dir"
}

up() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            say "installing slurm-wlm and munge"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
                >/dev/null 2>&1 || { say "apt-get install slurm-wlm munge failed"; exit 3; }
        else
            say "slurm-wlm/munge are not installed and cannot be installed here (needs root and apt-get)"; exit 3
        fi
    fi
    if [ "$(id -u)" != 0 ]; then say "the daemons must be started as root"; exit 3; fi
    down  # a cluster left over from an earlier `up`
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir/munge"
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"  # leave a tenth to the system
    # two free ports in a row (Slurm's own 6817/6818 unless another cluster, e.g. a second checkout's CI, has them)
    port="${EXITBENCH_SLURM_PORT:-6817}"
    while [ -n "$(ss -Htln "sport = :$port or sport = :$((port + 1))" 2>/dev/null)" ]; do port=$((port + 2)); done
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=exitbench
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=${EXITBENCH_SLURM_CRED_EXPIRE:-120}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=$port
SlurmdPort=$((port + 1))
ReturnToService=2
DefMemPerCPU=$((mem_mb / cpus))
KillWait=10
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munged.pid" --seed-file="$dir/munge/munge.seed" --log-file="$dir/munged.log" \
        || { say "munged did not start (see $dir/munged.log)"; exit 3; }
    slurmctld -f "$SLURM_CONF" -i || { say "slurmctld did not start (see $dir/slurmctld.log)"; exit 3; }
    slurmd -f "$SLURM_CONF" || { say "slurmd did not start (see $dir/slurmd.log)"; exit 3; }
    for _ in $(seq 120); do
        state="$(sinfo -h -n "$host" -o %T 2>/dev/null || true)"
        if [ "$state" = idle ]; then
            say "node $host idle ($cpus CPUs, $mem_mb MB), partition debug; logs in $dir"
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    say "the node did not become idle in 60 s (state: ${state:-none}); see $dir/slurmctld.log and $dir/slurmd.log"
    down
    exit 3
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
