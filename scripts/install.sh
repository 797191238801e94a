#!/usr/bin/env bash
# Installs everything moru needs on a Debian (bookworm or newer) host, as root:
# system packages (QEMU, vhost-device-vsock, image build tools, nftables, ...),
# a Python virtualenv with moru installed in it, and the JS SDK's packages
# (Node and npm from Debian where missing; `npm ci` in js/).
#
# Mirrors come from the machine's own apt configuration (npm's from the
# machine's npm configuration); no registry host is named here. vhost-device-vsock is only in Debian unstable for now: when the
# distribution lacks it we add unstable as an extra source pinned at priority
# 100, so only packages we name explicitly ever come from there.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${MORU_VENV:-/opt/moru/venv}
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "install.sh must run as root" >&2; exit 1; }

apt_packages=(
  qemu-system-x86 qemu-utils
  mmdebstrap e2fsprogs busybox-static kmod cpio zstd
  nftables iproute2 dnsmasq-base iptables curl
  python3 python3-venv python3-dev gcc
  systemd procps psmisc util-linux ca-certificates
  libnss-myhostname tmux
)

stamp=/var/lib/moru/.apt-installed
mkdir -p /var/lib/moru
want="${apt_packages[*]} vhost-device-vsock"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && command -v vhost-device-vsock >/dev/null \
   && command -v qemu-system-x86_64 >/dev/null; then
  log "system packages already installed"
else
  log "apt-get update"
  apt-get update -qq
  if ! apt-cache policy vhost-device-vsock 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    uris=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      uris=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uris" ] && [ -f /etc/apt/sources.list ]; then
      uris=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$uris" ] || { echo "cannot find the Debian mirror in apt's configuration" >&2; exit 1; }
    log "adding Debian unstable (pinned low) from $uris for vhost-device-vsock"
    cat >/etc/apt/sources.list.d/moru-unstable.sources <<EOF
Types: deb
URIs: $uris
Suites: unstable
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >/etc/apt/preferences.d/moru-unstable <<EOF
Package: *
Pin: release a=unstable
Pin-Priority: 100
EOF
    apt-get update -qq
  fi
  log "apt-get install ${apt_packages[*]} vhost-device-vsock"
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  # From unstable only this one package; it depends on nothing newer than bookworm has.
  apt-get install -y -qq --no-install-recommends vhost-device-vsock >/dev/null \
    || apt-get install -y -qq --no-install-recommends -t unstable vhost-device-vsock >/dev/null
  echo "$want" >"$stamp"
fi

# Exposed ports are `{port}-{sandbox_id}.localhost:{proxy_port}`: glibc (Python,
# browsers) resolves *.localhost to loopback only through nss-myhostname.
if ! grep -Eq '^hosts:.*\bmyhostname\b' /etc/nsswitch.conf; then
  log "adding myhostname to the hosts: line of /etc/nsswitch.conf"
  sed -i -E 's/^(hosts:[[:space:]]*files)\b/\1 myhostname/; t; s/^(hosts:)/\1 myhostname/' \
    /etc/nsswitch.conf
fi

# Python: a virtualenv with moru and its dev tools. Uses the python3 on PATH
# (3.11+); pip takes its index from the machine's pip configuration.
py=${MORU_PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
fi
log "pip install moru into $venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev]"
log "done: $venv/bin/moru-hostd, $venv/bin/guestd, $venv/bin/moru"

# JavaScript: Node 18+ and npm (Debian bookworm has nodejs 18), then the JS
# SDK's locked dependencies. No install scripts run: none is needed.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "apt-get install nodejs npm"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || { echo "Node $node_major is too old for js/ (need 18+)" >&2; exit 1; }
log "npm ci in js/"
(cd "$here/js" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
log "done: js/node_modules"
