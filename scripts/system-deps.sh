#!/usr/bin/env bash
# System packages dsdnode needs: libgmp-dev and a C compiler (fastecdsa, a libp2p dependency,
# builds from source), and iptables (the NAT tests build a "home router" network namespace that
# masquerades; iproute2 provides ip and tc), and chromium (the web UI's tests drive Debian's headless
# browser through Playwright). Installs only what is missing; needs root or sudo for that.
set -euo pipefail
need=()
for pkg in libgmp-dev gcc python3-dev iptables iproute2 chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# python3-dev is Debian's; a pyenv/python.org Python ships its own headers
if [ ${#need[@]} -gt 0 ] && python3 -c 'import sysconfig,os,sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'; then
  need=("${need[@]/python3-dev}")
fi
need=($(printf '%s\n' "${need[@]}" | grep -v '^$' || true))
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "dsdnode needs these system packages: ${need[*]} (install them with your package manager)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
