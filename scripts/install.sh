#!/usr/bin/env bash
# Installs everything Ferry needs on a fresh Debian machine (run as root):
# system packages with apt, then Ferry and its Python dependencies in ./.venv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(openvswitch-switch etcd-server etcd-client iputils-ping iputils-arping
              ethtool iproute2 tcpdump procps linux-perf)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install.sh: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip 2>/dev/null
fi
# Reinstall only when the project's dependency list changed since the last install.
stamp=.venv/.ferry-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # pip warns about optional local package indexes that this machine may lack; keep real errors.
  .venv/bin/pip install -q -e '.[dev]' 2> >(grep -v 'is ignored: it is neither' >&2)
  echo "$want" > "$stamp"
fi
