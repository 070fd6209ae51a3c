#!/bin/bash
# gpuflow dead-man's switch: runs on the instance (as root, from user-data) and
# shuts the machine down -- which terminates it, because gpuflow launches with
# InstanceInitiatedShutdownBehavior=terminate -- when nobody is using it.
#
# BUSY  while any of: some <base>/runs/*/job.pid names a live process whose
#       run has no exit_code yet; <base>/heartbeat was touched within the idle
#       window (gpuflow touches it on every connection, a job's supervisor
#       every 30 s); an SSH session is logged in (ss: established TCP to the
#       sshd port held by "sshd: user@..." -- `gpuflow ssh`, plain ssh,
#       editors, port forwards; not a scanner that never logs in); a GPU
#       is at least --gpu-threshold % busy (nvidia-smi, when there is one).
# IDLE  otherwise; after --idle-minutes of uninterrupted IDLE: shut down.
# CAP   at the --max-hours deadline: shut down, busy or not.  The deadline is
#       written once (first boot) to --deadline-file as an absolute time, so
#       neither a restart of this script nor a reboot moves it; within a boot
#       the kernel's uptime caps it too (immune to wall-clock steps).
#
# No `set -e`: a failed probe must not end the loop; a probe that cannot
# decide says "not busy".  Each check writes the verdict to --status-file
# (key=value lines; `gpuflow status` shows it).
#
# Options (or GPUFLOW_DEADMAN_<NAME> variables): --base-dir, --idle-minutes,
# --max-hours, --interval S, --shutdown-command, --log-file, --state-file
# (idle-period start, same boot), --status-file, --deadline-file, --ssh-port,
# --gpu-threshold PERCENT, --uptime-from boot|start (start: for tests).
# --arm-backstop: only make sure the deadline exists and schedule
# `shutdown -h` at it (+5 min), then exit (run at every boot).
# Tests: GPUFLOW_DEADMAN_IDLE_SECONDS, _MAX_SECONDS, _RETRY_SECONDS, _PROBE_TIMEOUT.

set -u
umask 022
export LC_ALL=C

base_dir="${GPUFLOW_DEADMAN_BASE_DIR:-/home/ubuntu/gpuflow}"
idle_minutes="${GPUFLOW_DEADMAN_IDLE_MINUTES:-60}"
max_hours="${GPUFLOW_DEADMAN_MAX_HOURS:-12}"
interval="${GPUFLOW_DEADMAN_INTERVAL:-30}"
shutdown_command="${GPUFLOW_DEADMAN_SHUTDOWN_COMMAND:-shutdown -h now}"
log_file="${GPUFLOW_DEADMAN_LOG_FILE:-/var/log/gpuflow-deadman.log}"
uptime_from="${GPUFLOW_DEADMAN_UPTIME_FROM:-boot}"
idle_seconds="${GPUFLOW_DEADMAN_IDLE_SECONDS:-}"
max_seconds="${GPUFLOW_DEADMAN_MAX_SECONDS:-}"
retry_seconds="${GPUFLOW_DEADMAN_RETRY_SECONDS:-60}"
state_file="${GPUFLOW_DEADMAN_STATE_FILE:-/run/gpuflow-deadman.idle-since}"
status_file="${GPUFLOW_DEADMAN_STATUS_FILE:-/run/gpuflow/deadman.status}"
deadline_file="${GPUFLOW_DEADMAN_DEADLINE_FILE:-/var/lib/gpuflow/deadline}"
ssh_port="${GPUFLOW_DEADMAN_SSH_PORT:-22}"
gpu_threshold="${GPUFLOW_DEADMAN_GPU_THRESHOLD:-5}"
probe_timeout="${GPUFLOW_DEADMAN_PROBE_TIMEOUT:-20}"
arm_backstop=""

usage() {
    echo "usage: gpuflow-deadman [--arm-backstop] [--base-dir D] [--idle-minutes M] [--max-hours H] [--interval S]" \
        "[--shutdown-command C] [--log-file F] [--state-file F] [--status-file F] [--deadline-file F] [--ssh-port P]" \
        "[--gpu-threshold PERCENT] [--uptime-from boot|start]" >&2
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --base-dir) base_dir="${2-}"; shift 2 ;;
        --idle-minutes) idle_minutes="${2-}"; idle_seconds=""; shift 2 ;;
        --max-hours) max_hours="${2-}"; max_seconds=""; shift 2 ;;
        --interval) interval="${2-}"; shift 2 ;;
        --shutdown-command) shutdown_command="${2-}"; shift 2 ;;
        --log-file) log_file="${2-}"; shift 2 ;;
        --state-file) state_file="${2-}"; shift 2 ;;
        --status-file) status_file="${2-}"; shift 2 ;;
        --deadline-file) deadline_file="${2-}"; shift 2 ;;
        --ssh-port) ssh_port="${2-}"; shift 2 ;;
        --gpu-threshold) gpu_threshold="${2-}"; shift 2 ;;
        --uptime-from) uptime_from="${2-}"; shift 2 ;;
        --arm-backstop) arm_backstop=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpuflow-deadman: unknown option: $1" >&2; usage; exit 2 ;;
    esac
done

log() {
    # One line per decision; never let a full disk or a bad path stop the loop.
    local line
    line="$(date -u '+%Y-%m-%dT%H:%M:%SZ' 2>/dev/null) gpuflow-deadman[$$]: $*"
    { printf '%s\n' "$line" >>"$log_file"; } 2>/dev/null || printf '%s\n' "$line" >&2
}

is_decimal() {
    # A non-negative decimal number: 12, 0.5, .25
    case "$1" in
        ''|.|*[!0-9.]*|*.*.*) return 1 ;;
        *) return 0 ;;
    esac
}

to_seconds() {
    # to_seconds VALUE FACTOR -> integer seconds (rounded up, at least 1)
    awk -v value="$1" -v factor="$2" 'BEGIN { s = value * factor; i = int(s); if (i < s) i++; if (i < 1) i = 1; print i }'
}

# Validate everything once; a bad value is a bug in the caller, so refuse to
# start (systemd shows the message) rather than run with a guess.
for pair in "idle-minutes:$idle_minutes" "max-hours:$max_hours" "interval:$interval" "retry-seconds:$retry_seconds" \
    "gpu-threshold:$gpu_threshold" "probe-timeout:$probe_timeout"; do
    if ! is_decimal "${pair#*:}"; then
        echo "gpuflow-deadman: --${pair%%:*} must be a non-negative number, got '${pair#*:}'" >&2
        exit 2
    fi
done
case "$ssh_port" in ''|*[!0-9]*) echo "gpuflow-deadman: --ssh-port must be a port number" >&2; exit 2 ;; esac
case "$uptime_from" in boot|start) ;; *) echo "gpuflow-deadman: --uptime-from must be boot or start" >&2; exit 2 ;; esac
case "$idle_seconds" in '') idle_seconds="$(to_seconds "$idle_minutes" 60)" ;; *[!0-9]*) echo "gpuflow-deadman: GPUFLOW_DEADMAN_IDLE_SECONDS must be an integer" >&2; exit 2 ;; esac
case "$max_seconds" in '') max_seconds="$(to_seconds "$max_hours" 3600)" ;; *[!0-9]*) echo "gpuflow-deadman: GPUFLOW_DEADMAN_MAX_SECONDS must be an integer" >&2; exit 2 ;; esac
[ -n "$shutdown_command" ] || { echo "gpuflow-deadman: empty --shutdown-command" >&2; exit 2; }
if ! awk -v value="$interval" 'BEGIN { exit !(value > 0) }'; then
    echo "gpuflow-deadman: --interval must be above 0" >&2
    exit 2
fi

monotonic_seconds() {
    # Seconds on a clock that wall-clock steps (NTP at boot!) cannot move: the
    # kernel's uptime; bash's SECONDS only where /proc is missing.
    local up
    if read -r up _ </proc/uptime 2>/dev/null && [ -n "${up%%.*}" ]; then
        printf '%s\n' "${up%%.*}"
    else
        printf '%s\n' "$SECONDS"
    fi
}

start_monotonic="$(monotonic_seconds)"

uptime_seconds() {
    local now
    now="$(monotonic_seconds)"
    if [ "$uptime_from" = boot ]; then
        printf '%s\n' "$now"
    else
        printf '%s\n' $(( now - start_monotonic ))
    fi
}

epoch_now() {
    local now
    now="$(date +%s 2>/dev/null)"
    case "$now" in ''|*[!0-9]*) now=0 ;; esac
    printf '%s\n' "$now"
}

file_mtime() {
    stat -c %Y -- "$1" 2>/dev/null || date -r "$1" +%s 2>/dev/null
}

write_atomically() {
    # write_atomically FILE TEXT: readers see the old or the new file, never half
    # (a temp file in the same directory, renamed over it).
    local temporary
    mkdir -p -- "${1%/*}" 2>/dev/null
    temporary="$(mktemp "${1%/*}/.${1##*/}.XXXXXX" 2>/dev/null)" || return 1
    if printf '%s' "$2" >"$temporary" && chmod 0644 "$temporary" && mv -f -- "$temporary" "$1"; then
        return 0
    fi
    rm -f -- "$temporary"
    return 1
}

probe() {
    # A probe must not hang the loop: bound it when timeout(1) exists.
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 2 "$probe_timeout" "$@"
    else
        "$@"
    fi
}

ensure_deadline() {
    # The --max-hours deadline, as an absolute time: read it, or (first boot)
    # write boot time + cap.  Sets $deadline.
    local saved="" now
    read -r saved <"$deadline_file" 2>/dev/null
    case "$saved" in
        ''|*[!0-9]*)
            now="$(epoch_now)"
            if [ "$now" -eq 0 ]; then
                # No wall clock: persist nothing; the uptime cap still holds.
                deadline=99999999999
                log "no wall clock; the cap counts from this boot only"
                return
            fi
            deadline=$(( now - $(uptime_seconds) + max_seconds ))
            if write_atomically "$deadline_file" "$deadline"$'\n'; then
                log "max-hours deadline set to $deadline ($(date -u -d "@$deadline" '+%Y-%m-%dT%H:%M:%SZ' 2>/dev/null)) in $deadline_file"
            else
                log "cannot write $deadline_file; the cap counts from this boot only"
            fi
            ;;
        *) deadline="$saved" ;;
    esac
}

ensure_deadline

if [ -n "$arm_backstop" ]; then
    # Independent of the loop below: if the switch could never run, this still
    # ends the instance at the deadline (plus a margin, so the switch's own,
    # second-accurate cap normally fires first).
    remaining=$(( deadline - $(epoch_now) ))
    minutes=0
    [ "$remaining" -gt 0 ] && minutes=$(( (remaining + 59) / 60 + 5 ))
    log "backstop: shutdown -h +$minutes (deadline $deadline)"
    shutdown -h "+$minutes" 'gpuflow: max-hours cap reached' >/dev/null 2>&1
    exit $?
fi

clock_ticks="$(getconf CLK_TCK 2>/dev/null || echo 100)"
case "$clock_ticks" in ''|*[!0-9]*|0) clock_ticks=100 ;; esac
boot_epoch="$(awk '$1 == "btime" { print $2 }' /proc/stat 2>/dev/null)"
case "$boot_epoch" in ''|*[!0-9]*) boot_epoch="" ;; esac

pid_is_live_job() {
    # pid_is_live_job PID PIDFILE: the process exists, is not a zombie, and is
    # not a later process that reused the pid of a job that already ended
    # (it must have started no later than the pid file was written).
    local pid="$1" pid_file="$2" stat_line rest start_ticks start_epoch written
    case "$pid" in ''|*[!0-9]*|0|1) return 1 ;; esac
    if [ -r "/proc/$pid/stat" ]; then
        stat_line="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
        rest="${stat_line##*) }"
        # shellcheck disable=SC2086
        set -- $rest
        [ "$#" -ge 20 ] || return 0
        case "$1" in Z|X|x) return 1 ;; esac
        start_ticks="${20}"
        written="$(file_mtime "$pid_file")"
        if [ -n "$boot_epoch" ] && [ -n "$written" ] && [ -n "$start_ticks" ]; then
            # Written before this boot: left over from before a reboot.
            [ "$written" -lt "$boot_epoch" ] && return 1
            # Started well after the file was written: the pid was reused.
            # The margin absorbs a wall-clock step after boot.
            start_epoch=$(( boot_epoch + start_ticks / clock_ticks ))
            [ "$start_epoch" -gt $(( written + 300 )) ] && return 1
        fi
        return 0
    fi
    kill -0 "$pid" 2>/dev/null
}

busy_reasons() {
    # Prints one line per reason the instance is busy (none: idle).
    local now pid_file run_dir pid heartbeat_time age peers count utilisation
    now="$(epoch_now)"
    if [ -d "$base_dir/runs" ]; then
        for pid_file in "$base_dir"/runs/*/job.pid; do
            [ -f "$pid_file" ] || continue
            run_dir="${pid_file%/job.pid}"
            [ -e "$run_dir/exit_code" ] && continue
            pid=""
            read -r pid <"$pid_file" 2>/dev/null
            pid="${pid%%[!0-9]*}"
            if pid_is_live_job "$pid" "$pid_file"; then
                printf 'job %s (pid %s) running\n' "${run_dir##*/}" "$pid"
            fi
        done
    fi
    if [ -f "$base_dir/heartbeat" ]; then
        heartbeat_time="$(file_mtime "$base_dir/heartbeat")"
        case "$heartbeat_time" in
            ''|*[!0-9]*) ;;
            *)
                age=$(( now - heartbeat_time ))
                # A heartbeat from the future (clock stepped back) counts only
                # within one idle window, so a bogus timestamp cannot pin the
                # instance up forever.
                if [ "$age" -lt "$idle_seconds" ] && [ "$age" -gt $(( -idle_seconds )) ]; then
                    printf 'heartbeat %ss ago\n' "$age"
                fi
                ;;
        esac
    fi
    # Logged-in SSH sessions: interactive shells, editors' remote sessions,
    # port forwards -- anything a person keeps open.  An established TCP
    # connection to sshd counts once some process holding it is a logged-in
    # session ("sshd: user@pts/0", "sshd-session: user@notty"): a scanner's
    # connection that never logs in ("sshd: [accepted]", "[preauth]") does not.
    # Holders that cannot be read: counted (it may be a person).
    peers="$(probe ss -tnp state established "( sport = :$ssh_port )" 2>/dev/null |
        while read -r first _ _ peer holders; do
            [ "$first" = Recv-Q ] || [ -z "$peer" ] && continue
            seen=unknown
            for pid in $(printf '%s' "$holders" | grep -o 'pid=[0-9]*' | cut -d= -f2); do
                title="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
                case "$title" in *@*) seen=session; break ;; ?*) seen=not-logged-in ;; esac
            done
            [ "$seen" = not-logged-in ] || printf '%s\n' "$peer"
        done)"
    if [ -n "$peers" ]; then
        count="$(printf '%s\n' "$peers" | wc -l)"
        printf 'SSH session(s): %s from %s\n' "${count// /}" "$(printf '%s\n' "$peers" | head -n 3 | tr '\n' ' ')"
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        utilisation="$(probe nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null |
            awk -v limit="$gpu_threshold" '$1 ~ /^[0-9.]+$/ && $1 + 0 > max { max = $1 + 0 } END { if (max >= limit && max > 0) print max }')"
        [ -n "$utilisation" ] && printf 'GPU %s%% busy (threshold %s%%)\n' "$utilisation" "$gpu_threshold"
    fi
}

write_status() {
    # write_status VERDICT STOP_AT: the verdict `gpuflow status` shows.
    local text line
    text="verdict=$1"$'\n'"updated_at=$now_epoch"$'\n'"idle_seconds=$idle_seconds"$'\n'"deadline=$deadline"$'\n'
    text+="idle_since=${idle_since_epoch}"$'\n'"stop_at=$2"$'\n'
    while IFS= read -r line; do
        [ -n "$line" ] && text+="reason=${line//[$'\001'-$'\037']/?}"$'\n'
    done <<<"$reasons"
    write_atomically "$status_file" "$text" 2>/dev/null
}

# Word-split on purpose below: the command and its arguments, found on PATH.
# shellcheck disable=SC2086
fire() {
    # Ask for the shutdown; if the machine is somehow still here after the
    # wait, the loop asks again (the decision is re-taken each time).
    local status
    log "FIRE: $1; running: $shutdown_command"
    # A log that cannot be opened must not stop the shutdown itself.
    if { : >>"$log_file"; } 2>/dev/null; then
        $shutdown_command >>"$log_file" 2>&1
        status=$?
    else
        $shutdown_command
        status=$?
    fi
    if [ "$status" -eq 0 ]; then
        log "shutdown command accepted; asking again in ${retry_seconds}s if still up"
        sleep_seconds="$retry_seconds"
    else
        log "shutdown command failed (exit $status); retrying in ${interval}s"
    fi
}

trap 'log "exiting (signal or error); a supervisor restarts me, the deadline is kept"' EXIT
trap 'exit 143' TERM INT HUP

log "start: base=$base_dir idle=${idle_seconds}s max=${max_seconds}s interval=${interval}s deadline=$deadline ssh-port=$ssh_port gpu-threshold=${gpu_threshold}% uptime-from=$uptime_from shutdown='$shutdown_command'"

idle_since=""        # monotonic time when the idle period began; empty while busy
last_state=""
# Resume an idle period a previous run of this script began (same boot: /run
# is emptied at boot and the clock is the kernel's uptime).
if read -r saved_idle_since <"$state_file" 2>/dev/null; then
    case "$saved_idle_since" in
        ''|*[!0-9]*) ;;
        *)
            if [ "$saved_idle_since" -le "$start_monotonic" ]; then
                idle_since="$saved_idle_since"
                last_state=idle
                log "resuming an idle period that began $(( start_monotonic - idle_since ))s ago"
            fi
            ;;
    esac
fi
while :; do
    sleep_seconds="$interval"
    now_monotonic="$(monotonic_seconds)"
    case "$now_monotonic" in ''|*[!0-9]*) now_monotonic="$SECONDS" ;; esac
    now_epoch="$(epoch_now)"
    up="$(uptime_seconds)"
    case "$up" in ''|*[!0-9-]*) up="$SECONDS" ;; esac
    reasons="$(busy_reasons)"
    idle_since_epoch=""
    if [ "$up" -ge "$max_seconds" ] || [ "$now_epoch" -ge "$deadline" ]; then
        write_status stopping "$now_epoch"
        fire "reached the cap: uptime ${up}s of ${max_seconds}s, or the max-hours deadline $deadline"
    elif [ -n "$reasons" ]; then
        if [ -n "$idle_since" ]; then rm -f -- "$state_file" 2>/dev/null; fi
        idle_since=""
        write_status busy ""
        kinds="$(printf '%s\n' "$reasons" | awk '{ print $1 }' | tr '\n' ' ')"
        if [ "$last_state" != "busy $kinds" ]; then log "busy: ${reasons//$'\n'/; }"; last_state="busy $kinds"; fi
    else
        if [ -z "$idle_since" ]; then
            idle_since="$now_monotonic"
            { printf '%s\n' "$idle_since" >"$state_file"; } 2>/dev/null
            log "idle: no live job, heartbeat, SSH session or GPU use; shutting down in ${idle_seconds}s unless that changes"
            last_state=idle
        fi
        idle_for=$(( now_monotonic - idle_since ))
        idle_since_epoch=$(( now_epoch - idle_for ))
        stop_at=$(( idle_since_epoch + idle_seconds ))
        [ "$stop_at" -gt "$deadline" ] && stop_at="$deadline"
        if [ "$idle_for" -ge "$idle_seconds" ]; then
            write_status stopping "$now_epoch"
            fire "idle for ${idle_for}s (limit ${idle_seconds}s)"
        else
            write_status idle "$stop_at"
        fi
    fi
    sleep "$sleep_seconds" || sleep 30
done
