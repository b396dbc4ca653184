#!/usr/bin/env bash
# Install a dsdnode server as a systemd service: the steps of README's "Running as a service",
# in order, so that they are the ones that work. Run as root from the repository root after
# installing dsdnode into /opt/dsdnode/.venv (e.g. `git clone ... /opt/dsdnode && cd /opt/dsdnode &&
# make install`). Safe to run again: existing config and peers files are kept.
#
#   scripts/install-systemd.sh [--model NAME] [--peer MULTIADDR]... [--no-enable]
#
# --root DIR installs everything under DIR instead of / (paths inside the installed config and unit
# point into DIR; no user is created, nothing is chowned, systemctl is not called): a dry run that
# tests can start the service's command from. --dsdnode BIN: the dsdnode executable ExecStart runs.
set -euo pipefail

ROOT=""
BIN=/opt/dsdnode/.venv/bin/dsdnode
MODEL=""
PEERS=()
ENABLE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="$(realpath -m "$2")"; shift 2 ;;
    --dsdnode) BIN="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --peer) PEERS+=("$2"); shift 2 ;;
    --no-enable) ENABLE=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install-systemd.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "$0")/.." && pwd)"
ETC="$ROOT/etc/dsdnode"
STATE="$ROOT/var/lib/dsdnode"
CACHE="$STATE/cache"            # the unit's DSDNODE_CACHE: pull into the cache the service reads
UNIT="$ROOT/etc/systemd/system/dsdnode.service"
fail() { echo "install-systemd.sh: $*" >&2; exit 1; }

[ -x "$BIN" ] || fail "$BIN is not an executable: install dsdnode first (README: Running as a service)"
if [ -z "$ROOT" ]; then
  [ "$(id -u)" -eq 0 ] || fail "run as root (or use --root DIR for a dry run)"
  # 1. an unprivileged system user and group, home = the state directory
  id dsdnode >/dev/null 2>&1 ||
    useradd --system --user-group --home-dir /var/lib/dsdnode --no-create-home --shell /usr/sbin/nologin dsdnode
  OWNER=(-o dsdnode -g dsdnode)
  AS_SERVICE=(runuser -u dsdnode --)
else
  OWNER=()
  AS_SERVICE=()
fi

# 2. directories: config (root's, readable), state and cache (the service user's, private)
install -d -m 0755 "$ETC" "$(dirname "$UNIT")"
install -d -m 0750 "${OWNER[@]}" "$STATE" "$CACHE"

# 3. config: the example with its paths under ROOT; an existing one is the operator's and is kept
relocate() { sed -e "s#/etc/dsdnode#$ETC#g" -e "s#/var/lib/dsdnode#$STATE#g" "$@"; }
if [ ! -e "$ETC/node.toml" ]; then
  relocate "$HERE/configs/node.example.toml" > "$ETC/node.toml.new"
  if [ -n "$MODEL" ]; then
    sed -i -E "s#^model = \"[^\"]*\"#model = \"$MODEL\"#" "$ETC/node.toml.new"
  fi
  mv "$ETC/node.toml.new" "$ETC/node.toml"
  chmod 0644 "$ETC/node.toml"
fi

# 4. peers file (the config's peers_file): the swarm's bootstrap peers, one multiaddr a line;
#    with none, this node starts a new swarm and others bootstrap from it
if [ ! -e "$ETC/peers.txt" ]; then
  { echo "# bootstrap peers of the swarm, one multiaddr (/ip4/H/tcp/P/p2p/ID) a line"
    for p in "${PEERS[@]}"; do echo "$p"; done; } > "$ETC/peers.txt"
  chmod 0644 "$ETC/peers.txt"
fi

# 5. the model named in the config, pulled as the service user into the service's cache
CONFIG_MODEL="$("$(dirname "$BIN")/python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["node"]["model"])' "$ETC/node.toml")"
"${AS_SERVICE[@]}" env DSDNODE_CACHE="$CACHE" HOME="$STATE" "$BIN" models pull "$CONFIG_MODEL"

# 6. the unit, with its paths under ROOT and ExecStart running BIN
relocate -e "s#/opt/dsdnode/.venv/bin/dsdnode#$BIN#g" "$HERE/systemd/dsdnode.service" > "$UNIT"
chmod 0644 "$UNIT"
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$UNIT"
fi

# 7. start it now and at every boot
if [ -z "$ROOT" ] && [ "$ENABLE" -eq 1 ]; then
  systemctl daemon-reload
  systemctl enable --now dsdnode
  echo "dsdnode is running: journalctl -u dsdnode -f"
else
  echo "installed under ${ROOT:-/}; not started"
fi
