#!/bin/sh
# Install the benchmark's optional tools where this machine allows it: wrk (the load
# generator; without it the bundled one is used), nginx (the C reference), redis-server
# (the rate-limit-on-redis scenario), valgrind (instructions per request,
# benchmarks/instructions.py), proxy.py (the Python reference, into .venv) and
# matplotlib (for --png, into .venv).
# Never fails the benchmark: whatever cannot be installed is reported as skipped.
set -u
missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v valgrind >/dev/null 2>&1 || missing="$missing valgrind"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    echo "bench: installing$missing" >&2
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null 2>&1 \
        || echo "bench: could not install$missing; those scenarios will be skipped" >&2
fi
PY="${1:-.venv/bin/python}"
if [ -x "$PY" ] && ! "$PY" -c "import proxy" >/dev/null 2>&1; then
    "$PY" -m pip install -q proxy.py >/dev/null 2>&1 \
        || echo "bench: could not install proxy.py; its scenario will be skipped" >&2
fi
if [ -x "$PY" ] && ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    "$PY" -m pip install -q matplotlib >/dev/null 2>&1 \
        || echo "bench: could not install matplotlib; --png will be skipped" >&2
fi
exit 0
