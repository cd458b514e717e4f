#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py (and for trying the SLURM profile).
#
#   tests/slurm/cluster.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu, as root), if missing
#   tests/slurm/cluster.sh start     # write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd; wait for idle
#   tests/slurm/cluster.sh status    # daemons and node state; exit 0 only when the node is up
#   tests/slurm/cluster.sh stop      # stop the three daemons by their pid files
#
# Every command is idempotent. Runs as root without systemd or cgroups: processes are tracked by
# proctrack/linuxproc, there is no accounting (so `sacct` fails: the profile asks `squeue`, and finished jobs
# stay visible to it for MinJobAge seconds). State, logs and pid files live in $QKRANK_SLURM_DIR.
# The config must be /etc/slurm/slurm.conf: the SLURM executor plugin drops SLURM_CONF from the environment of
# the `srun` it runs inside each job. A slurm.conf that this script did not write is never overwritten.
set -euo pipefail

STATE_DIR="${QKRANK_SLURM_DIR:-/tmp/qkrank-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by qkrank tests/slurm/cluster.sh"
MAX_TIME_MIN="${QKRANK_SLURM_MAXTIME:-30}"
CPUS_FACTOR=2    # node CPUs = 2 × this machine's (QKRANK_SLURM_CPUS sets the number itself)
MUNGE_PID="$STATE_DIR/munged.pid"
CTLD_PID="$STATE_DIR/slurmctld.pid"
SLURMD_PID="$STATE_DIR/slurmd.pid"

die() { echo "cluster.sh: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in the pid file is running
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "install needs root (apt-get install -y slurm-wlm munge)"
    command -v apt-get >/dev/null || die "no apt-get: install slurm-wlm (slurmctld, slurmd) and munge by hand"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
}

write_conf() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's config"
    fi
    # The node: this machine's memory as slurmd measures it, and CPUS_FACTOR × its CPUs. Test jobs spend
    # most of their time starting Python, and a training job waiting for its time limit must not hold back
    # the other run's jobs; each job still gets the threads it asks for.
    local memory cpus
    memory=$(slurmd -C | head -n 1 | sed -nE 's/.*RealMemory=([0-9]+).*/\1/p')
    cpus=${QKRANK_SLURM_CPUS:-$(( $(nproc) * CPUS_FACTOR ))}
    mkdir -p "$(dirname "$CONF")" "$STATE_DIR/state" "$STATE_DIR/spool"
    cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=qkrank
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroups here: track processes by parent pid, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No slurmdbd: no accounting, no sacct. squeue reports jobs until MinJobAge seconds after they end.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A request over a partition limit fails at submission instead of waiting forever.
EnforcePartLimits=ALL
# Seconds between SIGTERM and SIGKILL at a time limit: the train stage checkpoints in that window.
KillWait=10
ReturnToService=2
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
# The node's CPUs and memory are the ones given here, not slurmd's own count (config_overrides).
SlurmdParameters=config_overrides
NodeName=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=$MAX_TIME_MIN State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

node_state() {
    sinfo -h -N -o %T 2>/dev/null | head -n 1
}

start() {
    install
    [[ $(id -u) -eq 0 ]] || die "start needs root (the daemons run as root here)"
    if alive "$CTLD_PID" && alive "$SLURMD_PID" && alive "$MUNGE_PID"; then
        echo "cluster.sh: already running ($(node_state))"
        return 0
    fi
    stop quiet
    write_conf
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    munged --force --pid-file="$MUNGE_PID" --log-file="$STATE_DIR/munged.log" \
        --seed-file="$STATE_DIR/munged.seed" --socket=/run/munge/munge.socket.2
    # -c: start from an empty job table (a fresh cluster each start); both daemons fork into the background.
    slurmctld -c
    slurmd
    for _ in $(seq 1 60); do
        case "$(node_state)" in
            idle*|mixed*|alloc*) echo "cluster.sh: up: $(sinfo -h -o '%P %D %c CPUs %m MB %l %T')"; return 0 ;;
            drain*|down*) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "the node did not come up; see $STATE_DIR/slurmctld.log and $STATE_DIR/slurmd.log"
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM, wait up to 10 s, then SIGKILL; only the pid in FILE
    local file=$1 name=$2 pid
    [[ -s "$file" ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster.sh: $name ($pid) ignored SIGTERM; SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

stop() {
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$MUNGE_PID" munged
    [[ "${1:-}" == quiet ]] || echo "cluster.sh: stopped"
}

status() {
    local ok=0
    for pair in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
        if alive "${pair#*:}"; then echo "${pair%%:*}: running (pid $(cat "${pair#*:}"))"; else echo "${pair%%:*}: stopped"; ok=1; fi
    done
    if [[ $ok -eq 0 ]]; then
        sinfo -o '%P %D %c %m %l %T' || ok=1
        [[ "$(node_state)" =~ ^(idle|mixed|alloc) ]] || ok=1
    fi
    return $ok
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    restart) stop quiet; start ;;
    status) status ;;
    *) die "usage: $0 install|start|stop|restart|status" ;;
esac
