#!/usr/bin/env bash
# Install (Debian packages) and start what deployflag and its tests need, on 127.0.0.1 only.
#   scripts/services.sh rabbitmq   RabbitMQ for `make run` and the tests (idempotent)
#   scripts/services.sh test-deps  RabbitMQ + PostgreSQL server binaries + systemd-analyze
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
  # The disk fault scenarios mount a small tmpfs (util-linux's mount, in Debian's "mount").
  command -v mount >/dev/null || apt_install mount
}

case "${1:-}" in
  rabbitmq) rabbitmq ;;
  test-deps) test_deps ;;
  *) echo "usage: $0 rabbitmq|test-deps" >&2; exit 2 ;;
esac
