#!/usr/bin/env bash
# Create .venv (if needed) and install meterstream into it.
#   scripts/setup.sh          the package and its runtime dependencies
#   scripts/setup.sh --test   plus what the tests need (Python extras and Debian packages)
# Works on a fresh Debian machine with Python 3.11: installs python3-venv through apt when the
# interpreter cannot make a virtualenv on its own.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "meterstream needs Python 3.11 or newer as '$PY' (set PYTHON=... to choose another)" >&2
    exit 1
fi

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
apt_install() {
    command -v apt-get >/dev/null || { echo "apt-get not found: install $* by hand" >&2; return 1; }
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        apt_install "python${ver}-venv" || apt_install python3-venv
        "$PY" -m venv .venv
    fi
fi

.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_test" = 1 ]; then
    .venv/bin/python -m pip install -q -e '.[test,fast]'
else
    .venv/bin/python -m pip install -q -e '.[fast]'
fi

# Debian packages the tests need, each installed only when missing.
if [ "$want_test" = 1 ]; then
    # VictoriaMetrics: a real server of the InfluxDB v2 write API (tests/test_influx.py)
    [ -x /usr/bin/victoria-metrics ] || apt_install victoria-metrics
    command -v tshark >/dev/null || apt_install tshark   # reads exported pcap (tests/test_record_pcap.py)
    # Chromium for the dashboard's browser test (Playwright drives it; no browser download),
    # and a CJK font so its screenshots show the Chinese labels
    [ -x /usr/bin/chromium ] || apt_install chromium
    [ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || apt_install fonts-wqy-microhei
fi
