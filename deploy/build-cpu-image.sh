#!/bin/sh
# Build deploy/Dockerfile.cpu as TAG (default entropy-steer-cpu:local), on any host with a Docker
# daemon, registry or not:
#   debian:bookworm-slim       the Dockerfile's base: pulled where a registry answers, else made
#                              here from Debian's packages with mmdebstrap (minbase).
#   entropy-steer-build:local  that base plus this host's pip set-up: its CA bundle (which holds
#                              a TLS proxy's authority where there is one) and pip's local wheel
#                              folder. Only the build stage starts from it; the final image
#                              copies the virtual environment out and never carries the bundle.
# Where the wheel folder holds torch, PyTorch's index is not asked (TORCH_INDEX empty).
# Usage: deploy/build-cpu-image.sh [TAG]   (prints the build's seconds on its last line)
set -eu

TAG=${1:-entropy-steer-cpu:local}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
pip_config() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
CA_BUNDLE=$(pip_config cert)
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WHEELS=$(pip_config find-links)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1 \
        && ! timeout 60 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    echo "no registry: making debian:bookworm-slim from Debian's packages (mmdebstrap)"
    # Valid-Until checks are off as on such hosts' own apt (their mirror serves a snapshot);
    # documentation goes, as in Debian's slim images.
    mmdebstrap --variant=minbase --quiet \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" "$work/rootfs.tar" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
        "deb http://deb.debian.org/debian-security $SUITE-security main"
    docker import --change 'CMD ["bash"]' "$work/rootfs.tar" debian:bookworm-slim >/dev/null
    rm "$work/rootfs.tar"
fi

mkdir -p "$work/context/wheels"
cp "$CA_BUNDLE" "$work/context/ca-bundle.crt"
torch_index=https://download.pytorch.org/whl/cpu
if [ -n "$WHEELS" ] && ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
    cp "$WHEELS"/*.whl "$work/context/wheels/"
    torch_index=
fi
cat > "$work/context/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
COPY ca-bundle.crt /etc/pip-build/ca-bundle.crt
COPY wheels /etc/pip-build/wheels
ENV PIP_CERT=/etc/pip-build/ca-bundle.crt \
    PIP_FIND_LINKS=/etc/pip-build/wheels
DOCKERFILE
docker build -q --network host -t entropy-steer-build:local "$work/context" >/dev/null

docker build --network host -f "$ROOT/deploy/Dockerfile.cpu" \
    --build-arg BUILD_BASE=entropy-steer-build:local --build-arg TORCH_INDEX="$torch_index" \
    -t "$TAG" "$ROOT"
echo "built $TAG in $(( $(date +%s) - start )) s"
