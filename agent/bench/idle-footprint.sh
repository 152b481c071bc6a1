#!/usr/bin/env bash
# Measures the agent's idle footprint: resident memory after start-up and after serving a few
# `bbupgrade status` calls over mutual TLS, and the size of the release binary.
# Usage: agent/bench/idle-footprint.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release -p bbupgrade-agent -p bbupgrade >&2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/agent-footprint.XXXXXX")
chmod 755 "$WORK"
AGENT_PID=""
trap '[ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null; rm -rf "$WORK"' EXIT

BB=target/release/bbupgrade
$BB pki init --dir "$WORK/pki" >/dev/null
$BB pki issue --dir "$WORK/pki" --role agent --name node1 --san 127.0.0.1 >/dev/null
$BB pki issue --dir "$WORK/pki" --role coordinator --name bench >/dev/null
mkdir -p "$WORK/install/8.19.3/bin" "$WORK/home"
printf '#!/bin/sh\nexit 0\n' > "$WORK/install/8.19.3/bin/start-bitbucket.sh"
chmod 755 "$WORK/install/8.19.3/bin/start-bitbucket.sh"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
USER_LINE=""
[ "$(id -u)" = 0 ] && USER_LINE='user = "nobody"'
cat > "$WORK/agent.toml" <<TOML
node_id = "node1"
listen = "127.0.0.1:$PORT"
state_dir = "$WORK/state"
[tls]
ca = "$WORK/pki/ca.pem"
cert = "$WORK/pki/agent-node1.pem"
key = "$WORK/pki/agent-node1.key"
[bitbucket]
install_root = "$WORK/install"
current_install = "$WORK/install/8.19.3"
home = "$WORK/home"
$USER_LINE
status_url = "http://127.0.0.1:9/status"
[service]
kind = "scripts"
TOML
cat > "$WORK/inv.toml" <<TOML
tls = { ca = "$WORK/pki/ca.pem", cert = "$WORK/pki/coordinator-bench.pem", key = "$WORK/pki/coordinator-bench.key" }
[[clusters]]
name = "bench"
bitbucket_url = "http://127.0.0.1:9"
token_env = "UNUSED"
[[clusters.nodes]]
id = "node1"
agent = "127.0.0.1:$PORT"
TOML

target/release/bbupgrade-agent --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
AGENT_PID=$!
sleep 2
rss() { awk '/VmRSS/ {print $2}' "/proc/$AGENT_PID/status"; }
IDLE=$(rss)
for _ in 1 2 3 4 5; do $BB status --inventory "$WORK/inv.toml" --cluster bench >/dev/null; done
sleep 1
AFTER=$(rss)
HWM=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT_PID/status")
SIZE=$(stat -c %s target/release/bbupgrade-agent)
echo "agent RSS idle after start: $((IDLE / 1024)) MiB ($IDLE KiB)"
echo "agent RSS after 5 status calls: $((AFTER / 1024)) MiB ($AFTER KiB), peak $((HWM / 1024)) MiB"
echo "agent binary (release, stripped of debuginfo): $((SIZE / 1024 / 1024)) MiB ($SIZE bytes)"
