#!/usr/bin/env bash
# Builds the container image `scaleout` from this machine's own build,
# pulling nothing: a `FROM scratch` image holding the stripped binary,
# exactly the shared libraries it links (as ldd lists them), and an
# /etc/passwd naming the unprivileged user it runs as (uid 10001). No
# shell, no package manager.
#
# usage: scripts/image.sh [TAG [BINARY]]
#   TAG     the image's tag (default scaleout:latest)
#   BINARY  the binary to put in it (default: a release build, built now)
# Prints the image's size. Needs docker (the engine must answer).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-scaleout:latest}
BIN=${2:-}
if [[ -z $BIN ]]; then
  cargo build --release -q -p scaleout
  BIN=target/release/scaleout
fi
[[ -x $BIN ]] || { echo "$0: $BIN is not an executable" >&2; exit 2; }
docker version >/dev/null 2>&1 || { echo "$0: the docker engine does not answer" >&2; exit 2; }

ctx=$(mktemp -d /tmp/scaleout-image.XXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/root/usr/local/bin" "$ctx/root/etc" "$ctx/data" "$ctx/tmp"
objcopy --strip-debug "$BIN" "$ctx/root/usr/local/bin/scaleout" 2>/dev/null ||
  cp "$BIN" "$ctx/root/usr/local/bin/scaleout"
# The libraries the binary links, and the loader, at the paths it asks for.
ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
  while read -r lib; do
    mkdir -p "$ctx/root$(dirname "$lib")"
    cp -L "$lib" "$ctx/root$lib"
  done
cat >"$ctx/root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/:/sbin/nologin
scaleout:x:10001:10001:scaleout:/data:/sbin/nologin
PASSWD
cat >"$ctx/root/etc/group" <<'GROUP'
root:x:0:
scaleout:x:10001:
GROUP
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY --chown=0:0 root/ /
COPY --chown=10001:10001 data /data
COPY --chown=10001:10001 tmp /tmp
USER 10001:10001
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/scaleout"]
CMD ["--help"]
DOCKERFILE
docker build -q -t "$TAG" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
size=$(docker image inspect "$TAG" --format '{{.Size}}')
echo "$TAG: $((size / 1024 / 1024)) MiB ($size bytes)"
