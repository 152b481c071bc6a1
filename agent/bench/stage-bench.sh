#!/usr/bin/env bash
# Times the agent's one-pass stage (hash + gunzip + untar) against `sha256sum F && tar xzf F` on a
# release archive of mostly incompressible jars (400 MiB by default), best of 3 after a warm-up run.
# Usage: agent/bench/stage-bench.sh [PAYLOAD_MIB]
set -euo pipefail
cd "$(dirname "$0")/../.."

PAYLOAD_MIB=${1:-400}
VERSION=8.19.6
RUNS=3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stage-bench.XXXXXX")
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
ARCHIVE=$WORK/atlassian-bitbucket-$VERSION.tar.gz

echo "== building release binaries" >&2
cargo build --release -p bbupgrade-agent -p bbupgrade-sim >&2

echo "== making a ${PAYLOAD_MIB} MiB archive" >&2
target/release/bitbucket-sim archive --version "$VERSION" --out "$ARCHIVE" --payload-mib "$PAYLOAD_MIB" >&2
SHA=$(sha256sum "$ARCHIVE" | cut -d' ' -f1)
ls -l "$ARCHIVE" >&2
STAGE=(target/release/bbupgrade-agent stage --archive "$ARCHIVE" --sha256 "$SHA" --version "$VERSION" --install-root)

now() { date +%s.%N; }

# Runs "$@" in a fresh directory $dest RUNS+1 times (first is warm-up); prints the best wall seconds.
best_of() {
    local dest=$1
    shift
    local best=""
    for i in $(seq 0 "$RUNS"); do
        chmod -R u+w "$dest" 2>/dev/null || true
        rm -rf "$dest"
        mkdir -p "$dest"
        sync
        local t0 t1
        t0=$(now)
        "$@" >/dev/null
        t1=$(now)
        if [ "$i" -gt 0 ]; then
            best=$(python3 -c "import sys; a=float(sys.argv[1]); b='$best'; print(a if not b else min(a, float(b)))" "$(python3 -c "print($t1-$t0)")")
        fi
    done
    echo "$best"
}

baseline() { sha256sum "$ARCHIVE" >/dev/null && tar xzf "$ARCHIVE" -C "$WORK/d1"; }
ours() { "${STAGE[@]}" "$WORK/d2"; }

echo "== timing (best of $RUNS after a warm-up)" >&2
T_BASE=$(best_of "$WORK/d1" baseline)
T_OURS=$(best_of "$WORK/d2" ours)
python3 - "$T_BASE" "$T_OURS" "$PAYLOAD_MIB" <<'PY'
import sys
base, ours, mib = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print(f"archive payload: {mib} MiB")
print(f"sha256sum F && tar xzf F : {base:.3f} s")
print(f"bbupgrade stage (1 pass) : {ours:.3f} s")
print(f"ratio stage/baseline     : {ours / base:.2f} (target <= 0.50)")
PY
