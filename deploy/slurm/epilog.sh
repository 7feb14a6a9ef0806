#!/bin/bash
# Slurm epilog: release the pin the prolog took (`datamover release --pin slurm-$SLURM_JOB_ID`),
# so the job's replicas become evictable again. Install it beside prolog.sh, in the same
# place (Epilog= with Prolog=, EpilogSlurmctld= with PrologSlurmctld=); it reads the same
# settings file, /etc/datamover/slurm-hooks.conf (see prolog.sh).
#
# This script never fails: a failing Epilog drains the node, and a pin that was not released
# costs only cache space (the replica is kept from eviction) until an operator runs
#   datamover release --pin slurm-<job id>
# Every failure is logged to syslog (tag datamover-epilog) and to stderr, and it exits 0.
# Releasing is idempotent: releasing a pin that holds nothing (a job that asked for no data,
# a second node, a second run) succeeds and releases 0 replicas.

set -euo pipefail
trap 'exit 0' EXIT  # whatever happens below, the node is not drained because of us

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# A settings file that does not run cleanly is not sourced (see prolog.sh): a fatal error in
# it (`exit`, an unset variable under `set -u`) would end the epilog before it releases,
# unlogged. It is tried in a bash of its own first; if it fails, the defaults are used.
DM_HOOK_CONF=${DM_HOOK_CONF:-/etc/datamover/slurm-hooks.conf}
settings_error=""
if [[ -r $DM_HOOK_CONF ]]; then
    conf_rc=0
    # shellcheck disable=SC2016  # the inner bash expands it
    conf_err=$(DM_HOOK_CONF=$DM_HOOK_CONF "$BASH" -euo pipefail -c '. "$DM_HOOK_CONF"' \
        2>&1 >/dev/null </dev/null) || conf_rc=$?
    if ((conf_rc == 0)); then
        # shellcheck source=/dev/null
        . "$DM_HOOK_CONF"
    else
        conf_err=${conf_err%%$'\n'*}
        conf_err=${conf_err#"$DM_HOOK_CONF: "}
        settings_error="the settings file $DM_HOOK_CONF is broken (exit $conf_rc${conf_err:+: $conf_err})"
    fi
elif [[ -e $DM_HOOK_CONF ]]; then
    settings_error="the settings file $DM_HOOK_CONF cannot be read by uid $EUID"
fi
DM_HOOK_BIN=${DM_HOOK_BIN:-/opt/datamover/bin/datamover}
DM_HOOK_CONFIG=${DM_HOOK_CONFIG:-/etc/datamover/site.toml}
DM_HOOK_RUN_AS=${DM_HOOK_RUN_AS-datamover}
DM_HOOK_NODES=${DM_HOOK_NODES:-first}
DM_HOOK_RELEASE_TIMEOUT=${DM_HOOK_RELEASE_TIMEOUT:-60}
DM_HOOK_FALLBACK=${DM_HOOK_FALLBACK:-0}
DM_HOOK_MARK_DIR=${DM_HOOK_MARK_DIR:-/run/datamover-slurm}
daemon_only=(--daemon)
[[ $DM_HOOK_FALLBACK != 1 ]] || daemon_only=()

TAG=datamover-epilog
JOB=${SLURM_JOB_ID:-}
if [[ -z $JOB ]]; then
    echo "$TAG: SLURM_JOB_ID is not set: not started by Slurm" >&2
    exit 0
fi
if [[ ! $JOB =~ ^[0-9]+$ ]]; then  # it names the pin and the mark file: digits only
    echo "$TAG: SLURM_JOB_ID '$JOB' is not a job id (digits); nothing released" >&2
    exit 0
fi
PIN="slurm-$JOB"

log() {  # log PRIORITY MESSAGE...
    local prio=$1
    shift
    logger -t "$TAG" -p "user.$prio" -- "job $JOB: $*" 2>/dev/null || true
    printf '%s: job %s: %s\n' "$TAG" "$JOB" "$*" >&2
}

# With the settings unknown, so is where the prolog left its mark and on which nodes it
# pinned: release whatever the comment says, on every node (one cheap request each).
if [[ -n $settings_error ]]; then
    log err "$settings_error; releasing pin $PIN with the default settings, on every node"
fi

# The marks are where the prolog puts them: in DM_HOOK_MARK_DIR or, if it could not write
# there (run as SlurmUser, which cannot create /run/datamover-slurm), in its own directory.
marks=()
for mark in "$DM_HOOK_MARK_DIR/$JOB" "${TMPDIR:-/tmp}/datamover-slurm-$EUID/$JOB"; do
    [[ ! -e $mark ]] || marks+=("$mark")
done

# Nothing to do when the comment is known and asks for no data and the prolog left no mark
# (it marks every job it stages for: the user may have edited the comment since). When
# Slurm does not pass the comment (older releases), release anyway: one cheap request, and
# no query to slurmctld.
if [[ -z $settings_error && -n ${SLURM_JOB_COMMENT+set} && ${SLURM_JOB_COMMENT,,} != *datamover:* &&
    ${#marks[@]} -eq 0 ]]; then
    exit 0
fi

# Mirror the prolog: with DM_HOOK_NODES=first only the job's first node staged and pinned.
if [[ -z $settings_error && -n ${SLURMD_NODENAME:-} && $DM_HOOK_NODES == first &&
    -n ${SLURM_JOB_NODELIST:-} ]]; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || true)
    if ((${#nodes[@]} > 0)) && [[ ${nodes[0]} != "$SLURMD_NODENAME" ]]; then
        exit 0
    fi
fi

as_user=()
if ((EUID == 0)); then
    if ! run_uid=$(id -u "$DM_HOOK_RUN_AS" 2>/dev/null) || ((run_uid == 0)); then
        log err "DM_HOOK_RUN_AS '$DM_HOOK_RUN_AS' is not a user other than root; pin $PIN not released"
        exit 0
    fi
    as_user=(runuser -u "$DM_HOOK_RUN_AS" --)
fi

# `timeout 0` never times out, and a word that is not a number fails before releasing.
if [[ ! $DM_HOOK_RELEASE_TIMEOUT =~ ^[1-9][0-9]*$ ]]; then
    log warning "DM_HOOK_RELEASE_TIMEOUT must be a positive integer, not" \
        "'$DM_HOOK_RELEASE_TIMEOUT'; using 60"
    DM_HOOK_RELEASE_TIMEOUT=60
fi

# A pin left behind keeps its dataset at its version for every later job (their stages
# of another version wait for it), so a daemon that does not answer (exit 6: restarting)
# is asked again, within the time limit.
deadline=$((SECONDS + DM_HOOK_RELEASE_TIMEOUT))
left=$DM_HOOK_RELEASE_TIMEOUT
while :; do
    rc=0
    out=$(timeout --kill-after=10 "$left" ${as_user[@]+"${as_user[@]}"} \
        "$DM_HOOK_BIN" release ${daemon_only[@]+"${daemon_only[@]}"} \
        --config "$DM_HOOK_CONFIG" --pin "$PIN" --json 2>&1) || rc=$?
    ((rc == 6)) || break
    sleep 5
    left=$((deadline - SECONDS))
    ((left > 0)) || break  # `timeout 0` would never time out
done
out=${out//$'\n'/ }
if ((rc == 0)); then
    ((${#marks[@]} == 0)) || rm -f -- "${marks[@]}" 2>/dev/null || true
    log info "released pin $PIN: ${out:0:300}"
else
    log err "release of pin $PIN failed (exit $rc), release it by hand: ${out:0:300}"
fi
exit 0
