#!/usr/bin/env bash
# Debian packages the browser and Prometheus tests need (tests/service/http/test_web_page.py,
# tests/k8s/test_prometheus_live.py):
#   chromium, chromium-driver  headless browser + its WebDriver (Selenium is told their paths, so
#                              selenium-manager never downloads a browser)
#   prometheus                 the server and promtool
#   redis-server               the shared job store's tests start real servers (tests/service/jobs)
# Idempotent: when every binary is already there it returns at once, without `apt-get update`.
# Needs root (or passwordless sudo). Set SYSTEM_PACKAGES_FORCE=1 to reinstall.
set -euo pipefail

PACKAGES=(chromium chromium-driver prometheus redis-server)
BINARIES=(/usr/bin/chromium /usr/bin/chromedriver /usr/bin/prometheus /usr/bin/promtool /usr/bin/redis-server)

have_all() {
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "$b" ]] || return 1
  done
}

if [[ "${SYSTEM_PACKAGES_FORCE:-0}" != 1 ]] && have_all; then
  echo "system packages: already installed (${PACKAGES[*]})"
  exit 0
fi

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-system-packages: needs root or passwordless sudo to install ${PACKAGES[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q "${PACKAGES[@]}"
# The Debian packages start Prometheus and Redis services where systemd runs; the tests start their own.
have_all || { echo "install-system-packages: a binary is still missing after the install" >&2; exit 1; }
echo "system packages: installed (${PACKAGES[*]})"
