#!/usr/bin/env bash
# Install (Debian packages) and start what deployflag and its tests need, on 127.0.0.1 only.
#   scripts/services.sh rabbitmq   RabbitMQ for `make run` and the tests (idempotent)
#   scripts/services.sh test-deps  RabbitMQ + PostgreSQL server binaries + systemd-analyze +
#                                  Prometheus (server and promtool, never started as a service)
#   scripts/services.sh containers podman (runc), debootstrap, podman-compose: the container test
# The tests start their own throwaway PostgreSQL cluster; they only need the binaries.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "services.sh: need root (or sudo) for: $*" >&2; exit 1; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

rabbitmq_up() { rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

rabbitmq() {
  if command -v rabbitmq-diagnostics >/dev/null && rabbitmq_up; then
    echo "rabbitmq: already running"; return 0
  fi
  if [ ! -f /etc/rabbitmq/rabbitmq-env.conf ]; then
    # Written before installing: on machines without policy-rc.d the package starts the broker
    # at once, and it must listen on loopback only.
    as_root mkdir -p /etc/rabbitmq
    printf 'NODENAME=rabbit@localhost\nNODE_IP_ADDRESS=127.0.0.1\nERL_EPMD_ADDRESS=127.0.0.1\n' |
      as_root tee /etc/rabbitmq/rabbitmq-env.conf >/dev/null
  fi
  command -v rabbitmq-server >/dev/null || { echo "rabbitmq: installing"; apt_install rabbitmq-server; }
  rabbitmq_up || as_root service rabbitmq-server start >/dev/null
  # await_startup fails at once until the node has registered: poll it with a deadline.
  for _ in $(seq 1 60); do
    if as_root rabbitmqctl -q await_startup >/dev/null 2>&1 && rabbitmq_up; then
      echo "rabbitmq: ready on 127.0.0.1:5672"; return 0
    fi
    sleep 1
  done
  echo "rabbitmq: did not become ready within 60 s" >&2; exit 1
}

test_deps() {
  rabbitmq
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "postgresql: installing server binaries"; apt_install postgresql
  fi
  command -v systemd-analyze >/dev/null || { echo "systemd-analyze: installing"; apt_install systemd; }
  command -v sqlite3 >/dev/null || apt_install sqlite3
  # promtool checks and unit-tests the shipped alert rules; the server is scraped by a test.
  command -v promtool >/dev/null || { echo "prometheus: installing"; apt_install prometheus; }
  # The disk fault scenarios mount a small tmpfs (util-linux's mount, in Debian's "mount").
  command -v mount >/dev/null || apt_install mount
}

containers() {
  # podman with runc (crun cannot run with this kernel's hybrid cgroups), debootstrap for a base
  # image built locally (no registry is needed), podman-compose from PyPI into the virtualenv.
  command -v podman >/dev/null || { echo "podman: installing"; apt_install podman runc; }
  command -v runc >/dev/null || apt_install runc
  command -v debootstrap >/dev/null || { echo "debootstrap: installing"; apt_install debootstrap; }
  # Name resolution between compose services on podman's CNI networks.
  [ -x /usr/lib/cni/dnsname ] || apt_install golang-github-containernetworking-plugin-dnsname
  # compose's `init: true` runs podman's init (catatonit) as PID 1.
  [ -x /usr/libexec/podman/catatonit ] || apt_install catatonit
  local conf=/etc/containers/containers.conf
  if ! grep -qs '^runtime *= *"runc"' "$conf"; then
    # podman's default ulimits exceed the hard limits of these machines (setrlimit fails).
    as_root mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n\n[engine]\nruntime = "runc"\n' |
      as_root tee "$conf" >/dev/null
  fi
  [ -x .venv/bin/podman-compose ] || [ ! -x .venv/bin/pip ] || .venv/bin/pip install -q 'podman-compose>=1.0,<2'
}

case "${1:-}" in
  rabbitmq) rabbitmq ;;
  test-deps) test_deps ;;
  containers) containers ;;
  *) echo "usage: $0 rabbitmq|test-deps|containers" >&2; exit 2 ;;
esac
