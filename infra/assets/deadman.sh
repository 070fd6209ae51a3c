#!/bin/bash
# gpuflow dead-man's switch: runs on the instance (as root, from user-data) and
# shuts the machine down -- which terminates it, because gpuflow launches with
# InstanceInitiatedShutdownBehavior=terminate -- when nobody is using it.
#
# BUSY  when some <base>/runs/*/job.pid names a live process whose run has no
#       exit_code file yet, or <base>/heartbeat was touched within the idle
#       window (gpuflow touches it on every connection, a job's supervisor
#       every 30 s).
# IDLE  otherwise; after --idle-minutes of uninterrupted IDLE: shut down.
# CAP   after --max-hours of uptime: shut down, busy or not.
#
# Written to keep firing whatever happens: no `set -e` (a failed probe must
# not end the loop), every probe that cannot decide says "not busy", and the
# hour cap uses only the kernel's uptime, so a restart of this script (systemd
# restarts it) does not reset the cap.
#
# Options (each also settable through the environment variable shown):
#   --base-dir DIR           GPUFLOW_DEADMAN_BASE_DIR   default /home/ubuntu/gpuflow
#   --idle-minutes M         GPUFLOW_DEADMAN_IDLE_MINUTES   default 60 (fractions allowed)
#   --max-hours H            GPUFLOW_DEADMAN_MAX_HOURS      default 12 (fractions allowed)
#   --interval S             GPUFLOW_DEADMAN_INTERVAL       seconds between checks, default 30
#   --shutdown-command CMD   GPUFLOW_DEADMAN_SHUTDOWN_COMMAND  default "shutdown -h now" (looked up on PATH)
#   --log-file FILE          GPUFLOW_DEADMAN_LOG_FILE   default /var/log/gpuflow-deadman.log
#   --state-file FILE        GPUFLOW_DEADMAN_STATE_FILE default /run/gpuflow-deadman.idle-since
#                            (when the current idle period began, so a restart of
#                            this script does not restart the idle timer)
#   --uptime-from start      GPUFLOW_DEADMAN_UPTIME_FROM  "boot" (default: the kernel's uptime) or
#                            "start" (this script's start; for tests on a long-running machine)
#   GPUFLOW_DEADMAN_RETRY_SECONDS  wait after an accepted shutdown before asking again, default 60
# Seconds-based overrides for tests: GPUFLOW_DEADMAN_IDLE_SECONDS, GPUFLOW_DEADMAN_MAX_SECONDS.

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

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
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
        --uptime-from) uptime_from="${2-}"; shift 2 ;;
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
for pair in "idle-minutes:$idle_minutes" "max-hours:$max_hours" "interval:$interval" "retry-seconds:$retry_seconds"; do
    if ! is_decimal "${pair#*:}"; then
        echo "gpuflow-deadman: --${pair%%:*} must be a non-negative number, got '${pair#*:}'" >&2
        exit 2
    fi
done
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

file_mtime() {
    stat -c %Y -- "$1" 2>/dev/null || date -r "$1" +%s 2>/dev/null
}

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
            # Written before this boot: left over from before a reboot, whatever
            # process holds that pid now.
            [ "$written" -lt "$boot_epoch" ] && return 1
            # Started well after the file was written: the job ended and its pid
            # was reused.  The margin absorbs a wall-clock step after boot.
            start_epoch=$(( boot_epoch + start_ticks / clock_ticks ))
            [ "$start_epoch" -gt $(( written + 300 )) ] && return 1
        fi
        return 0
    fi
    kill -0 "$pid" 2>/dev/null
}

busy_reason() {
    # Prints why the instance is busy and succeeds, or fails when it is idle.
    local now pid_file run_dir pid heartbeat_time age
    now="$(date +%s)"
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
                return 0
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
                    return 0
                fi
                ;;
        esac
    fi
    return 1
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

trap 'log "exiting (signal or error); a supervisor restarts me, the uptime cap is kept"' EXIT
trap 'exit 143' TERM INT HUP

log "start: base=$base_dir idle=${idle_seconds}s max=${max_seconds}s interval=${interval}s uptime-from=$uptime_from shutdown='$shutdown_command'"

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
    up="$(uptime_seconds)"
    case "$up" in ''|*[!0-9-]*) up="$SECONDS" ;; esac
    if [ "$up" -ge "$max_seconds" ]; then
        fire "uptime ${up}s reached the cap of ${max_seconds}s"
    elif reason="$(busy_reason)"; then
        if [ -n "$idle_since" ]; then rm -f -- "$state_file" 2>/dev/null; fi
        idle_since=""
        if [ "$last_state" != busy ]; then log "busy: $reason"; last_state=busy; fi
    else
        if [ -z "$idle_since" ]; then
            idle_since="$now_monotonic"
            { printf '%s\n' "$idle_since" >"$state_file"; } 2>/dev/null
            log "idle: no live job and no heartbeat within ${idle_seconds}s; shutting down in ${idle_seconds}s unless that changes"
            last_state=idle
        fi
        idle_for=$(( now_monotonic - idle_since ))
        if [ "$idle_for" -ge "$idle_seconds" ]; then
            fire "idle for ${idle_for}s (limit ${idle_seconds}s)"
        fi
    fi
    sleep "$sleep_seconds" || sleep 30
done
