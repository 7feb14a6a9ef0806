#!/bin/bash
# Slurm prolog: stage the datasets a job declares, pinned to the job, before it starts.
#
# slurm.conf, either (a) on the compute nodes, as root:
#   Prolog=/etc/slurm/datamover-prolog.sh
#   PrologFlags=Alloc        # run on all nodes at allocation; the job waits for all of them
# or (b) once per job on the controller, as SlurmUser (a failure drains no node):
#   PrologSlurmctld=/etc/slurm/datamover-prolog.sh
# If PrologEpilogTimeout is set, make it at least DM_HOOK_STAGE_TIMEOUT + 150 s: by its own
# time limits a failing prolog can take DM_HOOK_STAGE_TIMEOUT + 125 s (squeue for the comment
# 35 s, the staging budget, 15 s to kill the CLI at its end, clean-up calls 75 s: release 35,
# AdminComment squeue 20 and scontrol update 20). See deploy/README.md for the trade-off.
#
# How a job declares its data: in the job comment, one word starting with "datamover:"
# followed by comma-separated logical paths, each optionally "@<version id>":
#   sbatch --comment="datamover:/proj/docking/run42,/ref/pdb@20261129T181500.123456Z-hpc-a-3f9a1c0b" job.sh
# Other words in the comment are ignored, so it can carry other notes too ("datamover:" in
# any case is not). Paths cannot contain whitespace, ',' or ';'; one with a quote or a '*',
# or an '@' in its last component not followed by a version id, fails the job. Spaces around the commas or after "datamover:" are allowed
# ("datamover: /a, /b"): a list left open goes on in the next word.
# A path named with two versions (or with and without one) is refused: it holds one replica.
# Why the comment: a prolog runs without the job's environment, so `--export=DATAMOVER_...`
# never reaches it, and a SPANK plugin would be compiled code on every node. The comment is
# stored with the job, survives requeue, is shown by squeue/sacct, and reaches the prolog as
# SLURM_JOB_COMMENT (recent Slurm) or, failing that, through one `squeue` query.
#
# For each path:  datamover stage PATH --wait --pin slurm-$SLURM_JOB_ID --priority job --json
# exit 0 only when every replica is verified ready at its mapped local path.
#
# On failure the prolog exits 1 and Slurm does NOT start the job. As `Prolog` that drains the
# node and requeues the job held ("launch failed requeued held"; not held with
# SchedulerParameters=nohold_on_prolog_fail); as `PrologSlurmctld` a batch job is requeued and
# an interactive one (salloc/srun) cancelled, and no node is drained. The reason goes to
# syslog (tag datamover-prolog), to the prolog's stderr (slurmd/slurmctld log) and, by
# default, into the job's AdminComment (`scontrol show job`), where the user can read it, fix
# the comment (`scontrol update job=ID comment=...`) and, if held, `scontrol release ID`.
# What the AdminComment held is kept: the reason is appended as "; datamover prolog: ..."
# (replacing the one of an earlier failure), within 1024 bytes.
# (Not held under PrologSlurmctld: a permanent error recurs each time the job is scheduled.)
#
# Idempotent: a requeued job keeps its id, stage only fetches what is missing or wrong, and
# pinning the same pin again is a no-op. Transient failures (exit 6: store or daemon
# unavailable; exit 4: a stage of the same dataset is running outside the daemon's queue,
# which itself runs one transfer per path at a time; exit 11: running jobs' pins hold the
# dataset at another version than this job asks for, until their epilogs release it) are
# retried with backoff until DM_HOOK_STAGE_TIMEOUT seconds have passed in total. If the limit is hit, the CLI is
# killed but a transfer already submitted keeps running in the daemon, so a requeued job
# usually finds its data ready. A failing prolog releases the pins it took (and the daemon
# takes the pin off that still-running transfer), so a held job does not keep data from
# eviction.
#
# Settings: optional shell file /etc/datamover/slurm-hooks.conf (root-owned), e.g.
#   DM_HOOK_BIN=/opt/datamover/bin/datamover
#   DM_HOOK_CONFIG=/etc/datamover/site.toml   # [api] url + token_file of the site daemon
#   DM_HOOK_RUN_AS=datamover                  # run the CLI as this user (not root) when
#                                             # started as root
#   DM_HOOK_STAGE_TIMEOUT=3600                # seconds for all datasets of the job
#   DM_HOOK_NODES=first                       # first: stage on the job's first node only
#                                             # (shared cache); all: on every node (node-local)
#   DM_HOOK_COMMENT_SOURCE=auto               # auto | env | squeue
#   DM_HOOK_MAX_PATHS=16
#   DM_HOOK_ADMIN_COMMENT=1                   # add the failure reason to AdminComment
#   DM_HOOK_RELEASE_TIMEOUT=60                # epilog: seconds for the release (not a
#                                             # positive integer: 60, with a warning)
#   DM_HOOK_FALLBACK=0                        # 1: with the daemon down, stage in-process
#                                             # (needs the catalog and store in the config)
#   DM_HOOK_MARK_DIR=/run/datamover-slurm     # where the prolog marks the jobs it pinned,
#                                             # so the epilog releases them whatever the
#                                             # comment says by then; if this user cannot
#                                             # write there: ${TMPDIR:-/tmp}/datamover-slurm-<uid>
# The file is run by bash under `set -euo pipefail`, in a bash of its own first: if that
# fails (a typo such as `DM_HOOK_NODES = all`), the file is not used, a job asking for data
# fails naming the file and the error, the others start, and the epilog logs it and releases
# with the defaults.
#
# The CLI is run with `--daemon`: a daemon that does not answer (restarting, overloaded) is
# exit 6, retried as above, not a stage in-process on a host whose config names only the
# daemon, which fails (exit 7: no store credentials) and would drain the node.
#   PATH=/opt/slurm/bin:$PATH                 # where squeue/scontrol live, if not in /usr/bin

set -euo pipefail

# Slurm runs prologs with no search path.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# A settings file that does not run cleanly (a typo such as `DM_HOOK_NODES = all`, an
# unclosed `$((`) is not sourced here, where under `set -e` it would end the prolog, unlogged
# and non-zero, for every job: it is tried first in a bash of its own, and what went wrong
# fails only the jobs that ask for data (settings_error, below), which then say why.
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
DM_HOOK_STAGE_TIMEOUT=${DM_HOOK_STAGE_TIMEOUT:-3600}
DM_HOOK_NODES=${DM_HOOK_NODES:-first}
DM_HOOK_COMMENT_SOURCE=${DM_HOOK_COMMENT_SOURCE:-auto}
DM_HOOK_MAX_PATHS=${DM_HOOK_MAX_PATHS:-16}
DM_HOOK_ADMIN_COMMENT=${DM_HOOK_ADMIN_COMMENT:-1}
DM_HOOK_FALLBACK=${DM_HOOK_FALLBACK:-0}
DM_HOOK_MARK_DIR=${DM_HOOK_MARK_DIR:-/run/datamover-slurm}
daemon_only=(--daemon)
[[ $DM_HOOK_FALLBACK != 1 ]] || daemon_only=()

TAG=datamover-prolog
as_user=()  # the command prefix that runs the CLI as DM_HOOK_RUN_AS (set below)
JOB=${SLURM_JOB_ID:?SLURM_JOB_ID is not set: not started by Slurm}
if [[ ! $JOB =~ ^[0-9]+$ ]]; then  # it names the pin and the mark file: digits only
    echo "$TAG: SLURM_JOB_ID '$JOB' is not a job id (digits); the job is not started" >&2
    exit 1
fi
PIN="slurm-$JOB"

log() {  # log PRIORITY MESSAGE...
    local prio=$1
    shift
    logger -t "$TAG" -p "user.$prio" -- "job $JOB: $*" 2>/dev/null || true
    printf '%s: job %s: %s\n' "$TAG" "$JOB" "$*" >&2
}

pinned=0  # set once a stage has run: a failure then releases what this run pinned

fail() {  # fail MESSAGE: report and refuse to start the job
    local msg=$*
    log err "$msg; the job is not started"
    # A held job may wait for days: do not keep its datasets from eviction meanwhile.
    # (The epilog releases too; a requeued job pins again.)
    if ((pinned)); then
        timeout --kill-after=5 30 ${as_user[@]+"${as_user[@]}"} "$DM_HOOK_BIN" release \
            ${daemon_only[@]+"${daemon_only[@]}"} --config "$DM_HOOK_CONFIG" --pin "$PIN" \
            --json >/dev/null 2>&1 || true
    fi
    [[ $DM_HOOK_ADMIN_COMMENT != 1 ]] || admin_comment "$msg"
    exit 1
}

cut_utf8() {  # cut_utf8 TEXT: TEXT without the incomplete UTF-8 character a cut left at its end
    local LC_ALL=C text=$1 i need
    for ((i = ${#text} - 1; i >= 0 && i >= ${#text} - 4; i--)); do
        case ${text:i:1} in
            [$'\x80'-$'\xbf']) continue ;;  # a continuation byte: look further back
            [$'\xc0'-$'\xdf']) need=2 ;;
            [$'\xe0'-$'\xef']) need=3 ;;
            [$'\xf0'-$'\xf7']) need=4 ;;
            *) need=1 ;;
        esac
        ((${#text} - i >= need)) || text=${text:0:i}
        break
    done
    printf '%s' "$text"
}

head_utf8() {  # head_utf8 N TEXT: TEXT's first N bytes, without a character cut in two
    local LC_ALL=C
    cut_utf8 "${2:0:$1}"
}

# bytes: slurmctld refuses a job whose Comment is longer; AdminComment is held to it too
ADMIN_COMMENT_MAX=1024

admin_comment() {  # admin_comment REASON: add "datamover prolog: REASON" to the AdminComment
    # The site may keep its own text there (an accounting tag, an operator's note): it is
    # kept, and ours follows it after "; ". Ours is always last, so a requeued job failing
    # again replaces the datamover part only. Whatever cannot be read is not overwritten.
    local LC_ALL=C  # lengths and cuts in bytes
    local tag="datamover prolog: " reason=$1 current kept room valid
    # Only UTF-8 goes in: bytes that are not (from the job comment, the CLI's output) are
    # dropped, and the reason is cut to 400 bytes, or to the room left, at a character's end.
    if command -v iconv >/dev/null 2>&1; then
        valid=$(printf '%s' "$reason" | iconv -c -f UTF-8 -t UTF-8 2>/dev/null) || true
        [[ -z $valid ]] || reason=$valid
    fi
    if ! current=$(timeout --kill-after=5 15 \
        squeue --noheader --jobs="$JOB" --Format=admin_comment:0 2>/dev/null); then
        log warning "AdminComment not written: squeue could not read the one there"
        return 0
    fi
    [[ $current != "(null)" ]] || current=""
    if [[ $current == "$tag"* ]]; then
        kept=""
    else
        kept=${current%%"; $tag"*}
        [[ -z $kept ]] || kept+="; "
    fi
    room=$((ADMIN_COMMENT_MAX - ${#kept} - ${#tag}))
    if ((room < 40)); then
        log warning "AdminComment not written: the ${#kept} bytes there leave no room"
        return 0
    fi
    ((room < 400)) || room=400
    if ((${#reason} > room)); then
        reason=$(head_utf8 "$room" "$reason")
    fi
    timeout --kill-after=5 15 scontrol update "JobId=$JOB" "AdminComment=$kept$tag$reason" \
        >/dev/null 2>&1 || log warning "AdminComment not written: scontrol update failed"
}

# --- where ---------------------------------------------------------------------------------

# As `Prolog` this runs on every node of the job. On a shared cache (Lustre, GPFS, JuiceFS)
# one stage is enough; N of them would queue behind each other and each re-check the whole
# tree. So stage on the job's first node only. This relies on PrologFlags=Alloc, under
# which the job starts only after the prolog has finished on every node, so the other nodes
# need not wait for it here. They are told apart before anything can fail, so a mistake
# (in the comment, in the settings) fails the job on the one node that would stage, not on
# every node of it (each drained, each writing the AdminComment). A DM_HOOK_NODES that is
# neither value counts as `first` here; the first node then fails on it.
other_node=""  # yes or no, once known
on_other_node() {  # true when another node of the job stages for it
    if [[ -z $other_node ]]; then
        other_node=no
        if [[ -n ${SLURMD_NODENAME:-} && $DM_HOOK_NODES != all && -n ${SLURM_JOB_NODELIST:-} ]]; then
            mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || true)
            if ((${#nodes[@]} > 0)) && [[ ${nodes[0]} != "$SLURMD_NODENAME" ]]; then
                other_node=yes
            fi
        fi
    fi
    [[ $other_node == yes ]]
}

# --- which datasets ------------------------------------------------------------------------

# SLURM_JOB_COMMENT reaches prologs in recent Slurm releases; older ones need a query to
# slurmctld (squeue prints the comment alone with %k; "(null)" when there is none), which
# the other nodes of the job need not make.
case $DM_HOOK_COMMENT_SOURCE in
    auto | env | squeue) ;;
    *)
        settings_error+="${settings_error:+; }DM_HOOK_COMMENT_SOURCE must be auto, env or squeue,"
        settings_error+=" not '$DM_HOOK_COMMENT_SOURCE'"
        DM_HOOK_COMMENT_SOURCE=auto  # to tell whether the job asks for data at all
        ;;
esac
if [[ $DM_HOOK_COMMENT_SOURCE == env ]] ||
    [[ $DM_HOOK_COMMENT_SOURCE == auto && -n ${SLURM_JOB_COMMENT+set} ]]; then
    comment=${SLURM_JOB_COMMENT:-}
else
    ! on_other_node || exit 0
    comment=$(timeout --kill-after=5 30 squeue --noheader --jobs="$JOB" --format=%k) ||
        fail "cannot read the job comment: squeue failed${settings_error:+; $settings_error}"
fi
[[ $comment != "(null)" ]] || comment=""

spec=""
words=()
read -r -d '' -a words < <(printf '%s' "$comment" | tr ';[:space:]' ' ') || true
# A list left open, by "datamover:" alone or a trailing ',', goes on in the next word, as
# does one followed by a word starting with ',': "datamover: /a, /b" names both paths
# rather than none.
open=0  # the last word left the list open
in_list=0  # the last word was part of the list
for word in ${words[@]+"${words[@]}"}; do  # bash < 4.4 calls an empty "${a[@]}" unbound under set -u
    if [[ ${word,,} == datamover:* ]]; then  # DATAMOVER: too: a job must not start without its data
        word=${word:10}
    elif ! ((open)) && ! { ((in_list)) && [[ $word == ,* ]]; }; then
        in_list=0
        continue
    fi
    spec+="$word,"
    in_list=1
    open=0
    [[ -n $word && $word != *, ]] || open=1
done
if [[ -z ${spec//,/} ]]; then
    exit 0  # the job asked for nothing
fi
! on_other_node || exit 0

# Settings are checked only now, so a mistake in them affects only jobs that ask for data.
[[ -z $settings_error ]] || fail "$settings_error"
for n in DM_HOOK_STAGE_TIMEOUT DM_HOOK_MAX_PATHS; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || fail "$n must be a positive integer, not '${!n}'"
done
case $DM_HOOK_NODES in first | all) ;; *) fail "DM_HOOK_NODES must be first or all" ;; esac

paths=()
versions=()
items=()
declare -A seen=()
IFS=, read -r -a items <<<"$spec"
for item in "${items[@]}"; do
    [[ -n $item ]] || continue
    version=""
    word=$item  # as written, for messages ('/' is '' once its slash is cut)
    # Never evaluated, but a word a shell would have read otherwise is refused: the job's
    # owner meant something else than what would be staged.
    [[ $item != *[\'\"*]* ]] ||
        fail "'$item' in the job comment holds a quote or '*'; stage such a dataset from the job script"
    item=${item%/}  # /proj/a/ is /proj/a (as datamover reads it), so stage it once
    if [[ $item =~ ^(/.+)@([0-9]{8}T[^@/]+)$ ]]; then
        item=${BASH_REMATCH[1]}
        version=${BASH_REMATCH[2]}
    fi
    # "@" in the last component is a version asked for: one that is no version id is a
    # mistake (/proj/ds@v2), not a dataset's name. An "@" above it is a path's
    # (/proj/user@host/run1).
    [[ ${item##*/} != *@* ]] ||
        fail "'$item' in the job comment: '@' must be followed by a version id (as" \
            "20261129T181500.123456Z-site-3f9a1c0b)"
    # A logical path is absolute; datamover itself rejects '..', bad names and unmapped
    # prefixes. Starting with '/' also means it can never be taken for an option.
    [[ $item == /?* ]] || fail "'$word' in the job comment is not a dataset path (/prefix/...)"
    item=${item%/}  # /proj/a@V/ is /proj/a at V
    if [[ -n ${seen[$item]+x} ]]; then
        # One replica per path: staging a second version would replace the first.
        [[ ${seen[$item]} == "$version" ]] ||
            fail "the job comment names $item with two versions:" \
                "${seen[$item]:-the latest} and ${version:-the latest}"
        continue
    fi
    seen[$item]=$version
    paths+=("$item")
    versions+=("$version")
done
if ((${#paths[@]} > DM_HOOK_MAX_PATHS)); then
    fail "the job comment names ${#paths[@]} datasets; at most $DM_HOOK_MAX_PATHS are allowed"
fi

# --- as whom --------------------------------------------------------------------------------

# Run the CLI as the daemon's user, never as root: if the daemon is unreachable the CLI
# stages in-process, and those files and catalog writes must have the daemon's ownership.
if ((EUID == 0)); then
    run_uid=$(id -u "$DM_HOOK_RUN_AS" 2>/dev/null) ||
        fail "DM_HOOK_RUN_AS user '$DM_HOOK_RUN_AS' does not exist on ${HOSTNAME}"
    ((run_uid != 0)) || fail "DM_HOOK_RUN_AS must name a user other than root, not '$DM_HOOK_RUN_AS'"
    as_user=(runuser -u "$DM_HOOK_RUN_AS" --)
fi
[[ -x $DM_HOOK_BIN ]] || fail "$DM_HOOK_BIN is not installed on ${HOSTNAME}"

# Mark the job before pinning: its epilog then releases the pin even if the user edited the
# comment meanwhile (`scontrol update job=ID comment=...`). The mark goes in DM_HOOK_MARK_DIR
# or, where this user cannot write there (SlurmUser cannot create /run/datamover-slurm: /run
# is root's), in ${TMPDIR:-/tmp}/datamover-slurm-<uid>, made 0700 and used only if it is a
# directory (not a symlink) of this user's that no one else can write to. The epilog looks
# in both. Without a mark the epilog still releases whenever the comment asks for data.
mark=""
own_dir=${TMPDIR:-/tmp}/datamover-slurm-$EUID
if { mkdir -p -- "$DM_HOOK_MARK_DIR" && : >"$DM_HOOK_MARK_DIR/$JOB"; } 2>/dev/null; then
    mark=$DM_HOOK_MARK_DIR/$JOB
else
    mkdir -m 0700 -- "$own_dir" 2>/dev/null || true
    if [[ -d $own_dir && ! -L $own_dir && -O $own_dir ]] &&
        [[ $(stat -c %a -- "$own_dir" 2>/dev/null) =~ ^[0-7]?[0-7][0145][0145]$ ]] &&
        { : >"$own_dir/$JOB"; } 2>/dev/null; then
        mark=$own_dir/$JOB
    fi
fi
if [[ -z $mark ]]; then
    log warning "no mark written (neither $DM_HOOK_MARK_DIR nor $own_dir is usable):" \
        "if the job comment changes before the job ends, its epilog will not release pin $PIN"
fi

# --- stage ----------------------------------------------------------------------------------

deadline=$((SECONDS + DM_HOOK_STAGE_TIMEOUT))

stage_one() {  # stage_one PATH VERSION: returns 0, or fails the prolog
    local path=$1 version=$2 delay=15 rc out left
    local args=(stage --config "$DM_HOOK_CONFIG" --wait --pin "$PIN" --priority job --json
        ${daemon_only[@]+"${daemon_only[@]}"})
    [[ -z $version ]] || args+=(--version "$version")
    args+=(-- "$path")
    while :; do
        left=$((deadline - SECONDS))
        ((left > 0)) || fail "stage $path: gave up after ${DM_HOOK_STAGE_TIMEOUT}s"
        rc=0
        pinned=1
        out=$(timeout --kill-after=15 "$left" ${as_user[@]+"${as_user[@]}"} \
            "$DM_HOOK_BIN" "${args[@]}" 2>&1) || rc=$?
        # On failure keep the one-line reason ("datamover: error: ...") rather than the JSON.
        if ((rc != 0)) && [[ $out == *"datamover: error:"* ]]; then
            out=$(grep -m 1 -- 'datamover: error:' <<<"$out" || true)
        fi
        out=$(head_utf8 300 "${out//$'\n'/ }")
        case $rc in
            0)
                log info "staged $path (pin $PIN): $out"
                return 0
                ;;
            124 | 137)
                fail "stage $path: not ready within ${DM_HOOK_STAGE_TIMEOUT}s" \
                    "(the daemon may still finish it)"
                ;;
            4 | 6 | 11)
                if ((SECONDS + delay >= deadline)); then
                    if ((rc == 11)); then
                        fail "stage $path: other jobs still hold another version of it" \
                            "(release their pins, or give this job that version): $out"
                    fi
                    fail "stage $path failed (exit $rc) and no time is left to retry: $out"
                fi
                log warning "stage $path: exit $rc, retrying in ${delay}s: $out"
                sleep "$delay"
                delay=$((delay * 2 > 120 ? 120 : delay * 2))
                ;;
            *)
                # 2 invalid input, 3 no such dataset/version, 5 corrupt, 7 store refused,
                # 8 catalog, 9 token refused, 10 transfer cancelled (by an operator, on
                # purpose), 70 internal: retrying gives the same answer.
                fail "stage $path failed (exit $rc): $out"
                ;;
        esac
    done
}

log info "staging ${#paths[@]} dataset(s) as pin $PIN (restart count" \
    "${SLURM_JOB_RESTART_COUNT:-0}${mark:+, marked in ${mark%/*}})"
for i in "${!paths[@]}"; do
    stage_one "${paths[$i]}" "${versions[$i]}"
done
exit 0
