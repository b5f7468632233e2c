#!/usr/bin/env bash
# Single-node SLURM (Debian slurm-wlm 22.05 + munge) for kvbench's cluster test and CI.
#
# Idempotent: installs the packages if missing, (re)writes /etc/slurm/slurm.conf only when its
# content changes, starts munged / slurmctld / slurmd only when they are not running, and waits
# until `sinfo` reports the node idle. Run as root. Takes ~15 s when nothing is installed yet
# (apt mirror reachable) and ~1 s when everything is already up.
#
# The cluster: one node (real hostname, CPUs and RealMemory from `slurmd -C`), select/cons_tres
# with CR_Core_Memory, proctrack/linuxproc + task/none (no cgroups needed: works in containers),
# no accounting (so `sacct` cannot answer: status goes through squeue, hence MinJobAge=3600 so
# finished jobs stay visible to squeue/scontrol for an hour), one partition `debug` (Default=YES).
# Plus, unless KVBENCH_SLURM_FAKE_GPUS=0, a partition `gpu` on the same node with 2 *fake* GPUs
# (GRES gpu:kvfake, "devices" /dev/null and /dev/zero): enough for sbatch --gpus=kvfake:1 to be
# accepted and scheduled, so the slurm-gpu profile's submissions and GPU concurrency can be
# tested on a machine without GPUs. Nothing here touches a real GPU.
#
# Exit codes: 0 ready; 77 the environment cannot host SLURM (not root, no apt/dpkg, install or
# daemon start failed, node never became idle) -- the reason is the last line on stderr and
# tests/test_slurm.py turns it into a skip; anything else is a bug in this script.
#
# Environment knobs: KVBENCH_SLURM_TIMEOUT (seconds to wait for an idle node, default 60),
# KVBENCH_SLURM_FAKE_GPUS (0 or 2, default 2: fake GPUs + partition `gpu`).

set -uo pipefail

SKIP=77
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
TIMEOUT=${KVBENCH_SLURM_TIMEOUT:-60}
FAKE_GPUS=${KVBENCH_SLURM_FAKE_GPUS:-2}
GRES_CONF=$CONF_DIR/gres.conf

log() { echo "[setup_slurm] $*" >&2; }
skip() {
    log "SKIP: $*"
    exit $SKIP
}

pid_of() { # pidfile -> the pid it names, if that process is running and is the daemon named
    # by the file (slurmd.pid -> slurmd): a stale file's pid may since belong to anything else
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null &&
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(basename "$1" .pid)" ]] && echo "$pid"
}
pid_alive() { pid_of "$1" >/dev/null; }

[[ $(id -u) -eq 0 ]] || skip "must run as root (installs packages and starts daemons)"
command -v dpkg >/dev/null 2>&1 || skip "dpkg not found: not a Debian-family system"

# ---- packages ------------------------------------------------------------------------------
need=()
for pkg in slurm-wlm munge; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    command -v apt-get >/dev/null 2>&1 || skip "apt-get not found; cannot install ${need[*]}"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/tmp/kvbench_slurm_apt.log 2>&1; then
        apt-get update -qq >>/tmp/kvbench_slurm_apt.log 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${need[@]}" >>/tmp/kvbench_slurm_apt.log 2>&1 ||
            skip "apt-get install ${need[*]} failed: $(tail -n 3 /tmp/kvbench_slurm_apt.log | tr '\n' ' ')"
    fi
fi
for bin in slurmctld slurmd sinfo sbatch squeue scontrol munged; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || skip "$bin missing after install"
done

# ---- slurm.conf ------------------------------------------------------------------------------
host=$(hostname -s)
getent hosts "$host" >/dev/null 2>&1 || skip "hostname $host does not resolve (add it to /etc/hosts)"
# slurmd -C prints the node's real layout, e.g.
#   NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
node_line=$(slurmd -C 2>/dev/null | grep '^NodeName=') || skip "slurmd -C failed"
mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"

case $FAKE_GPUS in
0)
    gres_types=""
    node_gres=""
    gpu_partition=""
    new_gres=""
    ;;
2)
    gres_types="GresTypes=gpu"
    node_gres=" Gres=gpu:kvfake:2"
    gpu_partition="PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP"
    # A gpu GRES needs device files (slurmd counts File= entries); any character device will do.
    new_gres="# Written by kvbench tests/slurm/setup_slurm.sh -- FAKE GPUs for scheduling tests only.
NodeName=$host Name=gpu Type=kvfake File=/dev/null
NodeName=$host Name=gpu Type=kvfake File=/dev/zero"
    ;;
*) echo "KVBENCH_SLURM_FAKE_GPUS must be 0 or 2, got '$FAKE_GPUS'" >&2 && exit 2 ;;
esac

new_conf=$(
    cat <<EOF
# Written by kvbench tests/slurm/setup_slurm.sh -- single-node test cluster, root-only.
ClusterName=kvbench
SlurmctldHost=$host
$gres_types
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Keep finished jobs in slurmctld for an hour: without accounting, squeue/scontrol are the only
# way the snakemake SLURM executor (and our test) can see a finished job's state.
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
# A job that asks for no memory gets 1 GB per CPU, not the whole node (CR_Core_Memory).
DefMemPerCPU=1024
$node_line$node_gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
$gpu_partition
EOF
)

conf_changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    [[ -f $CONF ]] && cp "$CONF" "$CONF.bak"
    printf '%s\n' "$new_conf" >"$CONF"
    conf_changed=1
    log "wrote $CONF ($node_line$node_gres)"
fi
if [[ -n $new_gres ]]; then
    if [[ ! -f $GRES_CONF ]] || [[ "$(cat "$GRES_CONF")" != "$new_gres" ]]; then
        printf '%s\n' "$new_gres" >"$GRES_CONF"
        conf_changed=1
        log "wrote $GRES_CONF (2 fake GPUs)"
    fi
elif [[ -f $GRES_CONF ]]; then
    rm -f "$GRES_CONF"
    conf_changed=1
fi

# ---- munge ---------------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || {
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
        fi
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    }
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 ||
        /usr/sbin/munged --force >/dev/null 2>&1 ||
        skip "munged failed to start"
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || skip "munge round trip fails after starting munged"
fi

# ---- daemons -------------------------------------------------------------------------------
if ((conf_changed)); then
    # A running daemon keeps the old node/partition layout: restart the ones we know by pid file.
    for pf in "$SLURMD_PID" "$CTLD_PID"; do
        if pid=$(pid_of "$pf"); then
            log "restarting $(basename "$pf" .pid) for the new slurm.conf"
            kill "$pid" 2>/dev/null
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
    done
fi
if ! pid_alive "$CTLD_PID"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld >>"$LOG_DIR/slurmctld.start.log" 2>&1 ||
        skip "slurmctld failed to start: $(tail -n 3 "$LOG_DIR/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
fi
for _ in $(seq 1 40); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.5
done
scontrol ping 2>/dev/null | grep -q "is UP" ||
    skip "slurmctld not answering: $(tail -n 3 "$LOG_DIR/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
if ! pid_alive "$SLURMD_PID"; then
    log "starting slurmd"
    /usr/sbin/slurmd >>"$LOG_DIR/slurmd.start.log" 2>&1 ||
        skip "slurmd failed to start: $(tail -n 3 "$LOG_DIR/slurmd.log" 2>/dev/null | tr '\n' ' ')"
fi

# ---- wait for an idle node -----------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=""
while ((SECONDS < deadline)); do
    state=$(sinfo -h -N -n "$host" -o '%t' 2>/dev/null | head -n 1)
    case $state in
    idle | mix | alloc) break ;;
    down* | drain* | drng* | inval*)
        # e.g. left down by an earlier run with another layout; ReturnToService=2 usually
        # handles this, resume explicitly otherwise.
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    sleep 1
done
case $state in
idle | mix | alloc) ;;
*) skip "node $host not idle after ${TIMEOUT}s (state '${state:-none}'): $(sinfo -h -N -o '%N %t %E' 2>&1 | head -n 3 | tr '\n' ' ')" ;;
esac

log "ready: $(sinfo -h -o '%P %a %D %t %c cpus %m MB' | tr '\n' ' ')"
exit 0
