#!/usr/bin/env bash
# Builds fastlb's container image (the Dockerfile beside the repo's root) on a machine with no image
# registry and no PyPI inside containers, as root on Debian:
#   1. installs docker.io and debootstrap when missing, and starts dockerd when none answers (it keeps
#      running; its log is $DOCKERD_LOG);
#   2. makes the base image $BASE from Debian's archive with debootstrap, the mirror taken from this
#      machine's apt sources (once: the image is kept under its name);
#   3. builds the sdist and a wheelhouse of every dependency and build requirement on this machine
#      (tests/install/dist.py, cached by content) and copies the wheelhouse into the build context;
#   4. builds the image offline (pip --no-index) and prints its name and size.
# Where a registry is reachable, `docker build --build-arg BASE=debian:bookworm-slim --build-arg
# PIP_OFFLINE= -t fastlb .` is all it takes.
#
# Environment: IMAGE (fastlb:latest), BASE (fastlb-base:bookworm), PYTHON (the repo's .venv python, which
# has `build`; `make setup` makes it), DOCKERD_LOG (/var/log/fastlb-dockerd.log).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-fastlb:latest}
BASE=${BASE:-fastlb-base:bookworm}
SUITE=bookworm
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/fastlb-dockerd.log}
DOCKERD_START_SECONDS=60
IMAGE_PYTHON=3.11.2              # Debian 12's python3: its dependency markers differ (redis wants async-timeout)
export DOCKER_BUILDKIT=0          # the classic builder: it takes the base from the local image store

say() { echo "build-image: $*" >&2; }

install_missing() {
  local missing=""
  command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || missing="$missing docker.io"
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing="$missing debootstrap"
  [ -z "$missing" ] && return
  say "installing$missing"
  # Debian would start the daemon on install; it is started below, with its log where we say.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  local status=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; } || status=$?
  rm -f /usr/sbin/policy-rc.d
  return $status
}

start_dockerd() {
  docker info >/dev/null 2>&1 && return
  say "starting dockerd (log: $DOCKERD_LOG)"
  setsid nohup "$(command -v dockerd || echo /usr/sbin/dockerd)" >"$DOCKERD_LOG" 2>&1 < /dev/null &
  for _ in $(seq $DOCKERD_START_SECONDS); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  say "dockerd did not answer within ${DOCKERD_START_SECONDS}s; its log:"; tail -20 "$DOCKERD_LOG" >&2
  return 1
}

# The Debian archive this machine's apt uses (one-line or deb822 sources), not its security archive.
debian_mirror() {
  { grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break }}'
    grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
  } | grep -v -- '-security' | head -1
}

make_base() {
  docker image inspect "$BASE" >/dev/null 2>&1 && return
  local mirror root
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || { say "no Debian mirror in /etc/apt/sources.list*"; return 1; }
  root=$(mktemp -d /tmp/fastlb-base.XXXXXX)
  say "debootstrap $SUITE from $mirror"
  debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >/dev/null
  # Slim as Debian's own -slim images: no package cache, lists, manuals or translations, now or later.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/{man,info,locale}/*
  find "$root/usr/share/doc" -type f ! -name copyright -delete
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    > "$root/etc/dpkg/dpkg.cfg.d/slim"
  tar -C "$root" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$root"
}

install_missing
start_dockerd
make_base
say "building the wheelhouse"
find "$REPO/docker/wheelhouse" -name '*.whl' -delete
# Without fastlb's own wheel: the image builds it from the source in its first stage.
"$PYTHON" "$REPO/tests/install/dist.py" --wheelhouse-for "$IMAGE_PYTHON" "$REPO/docker/wheelhouse" >/dev/null
say "building $IMAGE on $BASE"
docker build --network host --build-arg BASE="$BASE" -t "$IMAGE" "$REPO" >&2
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
echo "$IMAGE $((size / 1000000)) MB"
