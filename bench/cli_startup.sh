#!/usr/bin/env bash
# CLI start-up benchmark: how long `gpuflow --help` takes, and what it imports.
#
#   bash bench/cli_startup.sh            # 15 runs
#   RUNS=31 bash bench/cli_startup.sh    # more runs
#   STRICT=1 bash bench/cli_startup.sh   # also fail when the median misses the target
#
# Measures, each as the median of RUNS fresh processes (hyperfine when it is
# installed, else a Python timing loop):
#   1. `gpuflow --help` (the installed console script; without one, the same
#      entry point through `python -c 'from gpuflow.cli import main; main()'`),
#   2. `python -c 'import gpuflow.cli'`,
#   3. `gpuflow --help` with TYPER_USE_RICH=0 (typer's plain help, no rich):
#      what the rich-rendered help costs,
#   4. bare `python -c pass`, for reference (this interpreter's own floor).
# Then runs `--help` under `python -X importtime`, fails (exit 1) if any heavy
# package is imported (boto3, botocore, paramiko, fabric, invoke, tensorflow,
# keras, moto), and lists the top-level imports that dominate start-up.
# Target (issue 3): median `gpuflow --help` <= 0.2 s; `sky --help` 2.1 s and
# `spotty --help` 0.31 s on the same kind of machine, for reference.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
RUNS="${RUNS:-15}"
TARGET_SECONDS="${TARGET_SECONDS:-0.2}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if command -v gpuflow >/dev/null 2>&1; then
    help_command=(gpuflow --help)
else
    help_command=("$PYTHON" -c 'from gpuflow.cli import main; main()' --help)
fi
import_command=("$PYTHON" -c 'import gpuflow.cli')
bare_command=("$PYTHON" -c 'pass')

"${help_command[@]}" >/dev/null  # fails loudly if the CLI is broken; also warms the disk cache

median_of() {
    # median_of LABEL COMMAND... -> prints "LABEL <median seconds>"
    local label="$1"; shift
    if command -v hyperfine >/dev/null 2>&1; then
        local report
        report="$(mktemp)"
        hyperfine --style none --warmup 2 --runs "$RUNS" --export-json "$report" -- "$(printf '%q ' "$@")" >/dev/null
        "$PYTHON" -c 'import json, sys; print(sys.argv[2], "%.4f" % json.load(open(sys.argv[1]))["results"][0]["median"])' "$report" "$label"
        rm -f "$report"
    else
        "$PYTHON" - "$RUNS" "$label" "$@" <<'PY'
import statistics, subprocess, sys, time
runs, label, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
for _ in range(2):  # warm-up
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
samples = []
for _ in range(runs):
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    samples.append(time.perf_counter() - started)
print(label, "%.4f" % statistics.median(samples))
PY
    fi
}

tool="python timing loop"
command -v hyperfine >/dev/null 2>&1 && tool="hyperfine"
echo "cli_startup: median of $RUNS runs ($tool), $("$PYTHON" --version 2>&1), $(nproc) CPUs"
help_line="$(median_of "gpuflow --help" "${help_command[@]}")"
import_line="$(median_of "import gpuflow.cli" "${import_command[@]}")"
plain_line="$(median_of "plain help" env TYPER_USE_RICH=0 "${help_command[@]}")"
bare_line="$(median_of "python -c pass" "${bare_command[@]}")"
printf '  %-36s %ss\n' "gpuflow --help" "${help_line##* }" "import gpuflow.cli" "${import_line##* }" \
    "gpuflow --help, TYPER_USE_RICH=0" "${plain_line##* }" "python -c pass" "${bare_line##* }"

importtime_log="$(mktemp)"
trap 'rm -f "$importtime_log"' EXIT
"$PYTHON" -X importtime -c 'import sys; sys.argv = ["gpuflow", "--help"]
from gpuflow.cli import main
try:
    main()
except SystemExit:
    pass' >/dev/null 2>"$importtime_log"

status=0
"$PYTHON" - "$importtime_log" "${help_line##* }" "$TARGET_SECONDS" "${STRICT:-0}" <<'PY' || status=$?
import sys
log, median, target, strict = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
forbidden = ("boto3", "botocore", "paramiko", "fabric", "invoke", "tensorflow", "keras", "moto")
imported, top_level = set(), []
for line in open(log, encoding="utf-8"):
    if not line.startswith("import time:") or "|" not in line:
        continue
    _, cumulative, name = line[len("import time:"):].split("|", 2)
    if not cumulative.strip().isdigit():
        continue  # the header line
    module = name.rstrip("\n")
    stripped = module.lstrip()
    imported.add(stripped.split(".")[0])
    if len(module) - len(stripped) == 1:  # direct imports of the entry point
        top_level.append((int(cumulative), stripped))
heavy = sorted(set(forbidden) & imported)
print("  heavy packages imported by --help:", ", ".join(heavy) if heavy else "none")
print("  top imports by cumulative time (ms):")
for microseconds, module in sorted(top_level, reverse=True)[:8]:
    print(f"    {microseconds / 1000:7.1f}  {module}")
verdict = "meets" if median <= target else "MISSES"
print(f"  target: median gpuflow --help {median:.3f} s {verdict} the {target:.2f} s target")
if heavy or (strict and median > target):
    sys.exit(1)
PY
exit "$status"
