#!/usr/bin/env bash
# `make image-check`: builds both function images with podman and runs each as Knative
# runs it (read-only root, a tmpfs at /scratch for TMPDIR, user 10001, no capabilities,
# no new privileges, configuration in the environment) against a local S3 server
# (SeaweedFS from the development venv).  Checks, per image: what it contains
# (scripts/image_contents.py), that it serves (an upload answered 100; a notification
# written to archive/ and a day file on the mounted data volume), a start-up log without
# errors, and an exit of its own within seconds of SIGTERM.  docs/IMAGES.md has more.
#
#   scripts/image-check.sh
#       builds on a stand-in base: a Debian bookworm root file system (debootstrap,
#       python3 3.11.2) imported into podman once and kept for the next run;
#   PYTHON_IMAGE=python:3.11.14-slim-bookworm scripts/image-check.sh
#       builds on that image instead (where a registry is reachable).
#
# Other settings: DEBIAN_MIRROR (default: the one apt uses here), IMAGE_CHECK_CA_BUNDLE
# (a CA file pip must trust while building, e.g. a proxy's; default $PIP_CERT), PY (the
# development venv's python, default .venv/bin/python).
# Exits 1 when a check fails, and 0 with "skipped" where podman is missing and cannot be
# installed (CI may skip this check).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
STAND_IN=localhost/hisparc-datastore-stand-in:bookworm-python3
PREFIX=localhost/hisparc-datastore
TAG=image-check
FUNCTIONS=(upload writer)
STOP_TIMEOUT=10  # podman stop: SIGTERM, then SIGKILL after this many seconds
EXIT_WITHIN=5    # a container must have exited by itself within this many seconds
READY_WITHIN=60  # seconds to the first answer after podman run

work=$(mktemp -d "${TMPDIR:-/tmp}/image-check.XXXXXX")
containers=()
s3_pid=
results=()
failures=0
started=$SECONDS

cleanup() {
    local name
    for name in "${containers[@]}"; do
        pm rm --force --time 0 "$name" >/dev/null 2>&1 || true
    done
    if [[ -n "$s3_pid" ]]; then
        kill -TERM "$s3_pid" 2>/dev/null || true
        wait "$s3_pid" 2>/dev/null || true
    fi
    # Rootless podman: the writer's files belong to a subordinate uid.
    if [[ $(id -u) -ne 0 ]]; then podman unshare rm -rf "$work/data" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# podman with the OCI runtime chosen below, and limits for the containers it runs.
podman_global=()
limits=()
pm() { podman "${podman_global[@]}" "$@"; }

say() { printf 'image-check: %s\n' "$*"; }
skip() {
    say "skipped: $*"
    exit 0
}
record() {  # record PASS|FAIL "what"
    results+=("$1  $2")
    printf '  %s  %s\n' "$1" "$2"
    if [[ "$1" == FAIL ]]; then failures=$((failures + 1)); fi
}
check() {  # check "what" command...: PASS if the command succeeds
    local what=$1
    shift
    if "$@"; then record PASS "$what"; else record FAIL "$what"; fi
}
indent() { sed 's/^/      /'; }

# Installs a missing tool from Debian's packages where this runs as root with apt-get.
ensure_tool() {  # ensure_tool COMMAND PACKAGE
    command -v "$1" >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || return 1
    say "installing $2 (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$2" >"$work/apt-$2.log" 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq "$2"; } >>"$work/apt-$2.log" 2>&1 \
        || { tail -n 5 "$work/apt-$2.log" >&2; return 1; }
    command -v "$1" >/dev/null
}

# The Debian mirror apt uses here (debootstrap fetches bookworm from it).
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^[:space:]]+' \
          | grep -E '/debian/?$' | head -n 1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

make_stand_in() {
    [[ $(id -u) -eq 0 ]] || skip "debootstrap needs root; set PYTHON_IMAGE to a python:3.11 image"
    ensure_tool debootstrap debootstrap || skip "debootstrap is missing and could not be installed"
    local mirror root=$work/rootfs
    mirror=$(debian_mirror)
    say "making the stand-in base: debootstrap bookworm from $mirror (once; about a minute)"
    if ! debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" \
            "$mirror" >"$work/debootstrap.log" 2>&1; then
        tail -n 20 "$work/debootstrap.log" >&2
        say "FAILED: debootstrap"
        exit 1
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar --numeric-owner -C "$root" -cf "$work/rootfs.tar" .
    rm -rf "$root"
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$work/rootfs.tar" "$STAND_IN" >/dev/null
    rm -f "$work/rootfs.tar"
}

# --- tools ---------------------------------------------------------------------------

ensure_tool podman podman || skip "podman is not installed and could not be installed here"
if ! podman info >"$work/podman-info.log" 2>&1; then
    skip "podman cannot run here: $(tail -n 1 "$work/podman-info.log")"
fi
if [[ ! -x "$PY" ]] || ! "$PY" -c 'import hisparc_datastore_dev' 2>/dev/null; then
    say "FAILED: $PY has no development tools; run \`make venv\` first"
    exit 2
fi
command -v curl >/dev/null || { say "FAILED: curl is needed"; exit 2; }

# --- base image ----------------------------------------------------------------------

phase=$SECONDS
if [[ -n "${PYTHON_IMAGE:-}" ]]; then
    base=$PYTHON_IMAGE
    base_note="$base"
    if ! podman image exists "$base" && ! podman pull --quiet "$base" >"$work/pull.log" 2>&1; then
        tail -n 3 "$work/pull.log" >&2
        say "FAILED: cannot pull $base (without a registry, leave PYTHON_IMAGE unset)"
        exit 1
    fi
else
    base=$STAND_IN
    if podman image exists "$base"; then
        base_note="$base (stand-in, cached)"
    else
        make_stand_in
        base_note="$base (stand-in, made in $((SECONDS - phase)) s)"
    fi
fi
base_seconds=$((SECONDS - phase))
say "base image: $base_note"

# Where podman's defaults cannot start a container (a VM without CAP_SYS_RESOURCE, where
# podman's own limits are below the ones it asks for; crun on hybrid cgroups), explicit
# limits and then runc are tried.  The images do not depend on either.
choose_runtime() {
    local hard_nofile
    hard_nofile=$(ulimit -Hn)
    [[ "$hard_nofile" == unlimited ]] && hard_nofile=1048576
    local fallback=(--ulimit "nofile=$hard_nofile:$hard_nofile" --ulimit nproc=4096:4096)
    if podman run --rm --network none "$base" true >"$work/runtime.log" 2>&1; then
        return 0
    fi
    limits=("${fallback[@]}")
    if podman run --rm --network none "${limits[@]}" "$base" true >>"$work/runtime.log" 2>&1; then
        return 0
    fi
    if ensure_tool runc runc; then
        podman_global=(--runtime runc)
        pm run --rm --network none "${limits[@]}" "$base" true >>"$work/runtime.log" 2>&1 \
            && return 0
    fi
    return 1
}
if ! choose_runtime; then
    skip "podman cannot start a container here: $(tail -n 1 "$work/runtime.log")"
fi
if ((${#podman_global[@]} + ${#limits[@]})); then
    say "podman options for this machine: ${podman_global[*]} ${limits[*]}"
fi

# --- builds --------------------------------------------------------------------------

build_options=(--network host "${limits[@]}" --build-arg "PYTHON_IMAGE=$base")
ca=${IMAGE_CHECK_CA_BUNDLE:-${PIP_CERT:-}}
if [[ -n "$ca" && -f "$ca" ]]; then
    # pip trusts this CA while building: a pip.conf in root's home, mounted over /root for
    # every RUN.  /root is in every base, so the mount leaves nothing in the images (a
    # mount point that does not exist would be created, and kept, in every stage).
    mkdir -p "$work/build-home/.config/pip"
    cp "$ca" "$work/build-home/ca.pem"
    printf '[global]\ncert = /root/ca.pem\n' >"$work/build-home/.config/pip/pip.conf"
    chmod -R go+rX "$work/build-home"
    build_options+=(--volume "$work/build-home:/root:ro")
fi
declare -A build_seconds
for function in "${FUNCTIONS[@]}"; do
    phase=$SECONDS
    say "building $PREFIX-$function:$TAG"
    if pm build "${build_options[@]}" -f "functions/$function/Dockerfile" \
            -t "$PREFIX-$function:$TAG" . >"$work/build-$function.log" 2>&1; then
        build_seconds[$function]=$((SECONDS - phase))
        record PASS "$function: built in ${build_seconds[$function]} s"
    else
        record FAIL "$function: build (last lines below)"
        tail -n 25 "$work/build-$function.log" | indent
    fi
done
if ((failures)); then
    say "FAILED: an image did not build"
    exit 1
fi

# --- contents ------------------------------------------------------------------------

secure=("${limits[@]}" --read-only --read-only-tmpfs=false --user 10001:10001 --cap-drop ALL
        --security-opt no-new-privileges
        --tmpfs "/scratch:rw,nosuid,nodev,size=64m,mode=1777" --env TMPDIR=/scratch)
for function in "${FUNCTIONS[@]}"; do
    say "contents of the $function image"
    if pm run --rm --network none "${secure[@]}" \
            --volume "$PWD/scripts/image_contents.py:/check/image_contents.py:ro" \
            --volume "$PWD/locks:/check/locks:ro" "$PREFIX-$function:$TAG" \
            python /check/image_contents.py "/check/locks/$function.lock" "$function" \
            >"$work/contents-$function.log" 2>&1; then
        record PASS "$function: exactly its lock and the project; only the image's commands"
    else
        record FAIL "$function: contents"
    fi
    indent <"$work/contents-$function.log"
done

# --- serving -------------------------------------------------------------------------

say "starting SeaweedFS on loopback"
"$PY" scripts/image_check.py s3 "$work" >"$work/s3.log" 2>&1 &
s3_pid=$!
for _ in $(seq 1 1200); do
    [[ -f "$work/s3.env" ]] && break
    kill -0 "$s3_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ ! -f "$work/s3.env" ]]; then
    tail -n 20 "$work/s3.log" "$work/seaweedfs/weed.log" >&2 || true
    say "FAILED: the S3 server did not start"
    exit 1
fi
# shellcheck source=/dev/null
source "$work/s3.env"
say "$(head -n 1 "$work/s3.log")"

mapfile -t ports < <("$PY" scripts/image_check.py ports 4)
declare -A port=([upload]=${ports[0]} [writer]=${ports[1]})
declare -A metrics_port=([upload]=${ports[2]} [writer]=${ports[3]})
password=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(12))')
token=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
printf '501,Amsterdam,%s\n' "$password" >"$work/stations.csv"
chmod 0644 "$work/stations.csv"
mkdir -p "$work/data"
if [[ $(id -u) -eq 0 ]]; then
    chown 10001:10001 "$work/data"
else
    podman unshare chown 10001:10001 "$work/data"  # uid 10001 of the user namespace
fi
# Secrets and settings as the Knative Services pass them: in the environment.
cat >"$work/upload.env" <<EOF
AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
DATASTORE_BUCKET_ENDPOINT=$S3_ENDPOINT
DATASTORE_BUCKET_NAME=$S3_BUCKET
EOF
cp "$work/upload.env" "$work/writer.env"
printf 'DATASTORE_WRITER_AUTH_TOKEN=%s\n' "$token" >>"$work/writer.env"
chmod 0600 "$work"/*.env

declare -A ready_seconds
start_function() {  # start_function NAME: runs it and waits for its first answer
    local function=$1 name="image-check-$1-$$" extra=() began
    if [[ "$function" == writer ]]; then extra=(--volume "$work/data:/data"); fi
    containers+=("$name")
    began=$(date +%s.%N)
    pm run --detach --name "$name" --network host "${secure[@]}" \
        --env HOST=127.0.0.1 --env "PORT=${port[$function]}" \
        --env METRICS_HOST=127.0.0.1 --env "METRICS_PORT=${metrics_port[$function]}" \
        --env-file "$work/$function.env" \
        --volume "$work/stations.csv:/etc/hisparc-datastore/stations/stations.csv:ro" \
        "${extra[@]}" "$PREFIX-$function:$TAG" >/dev/null
    for _ in $(seq 1 $((READY_WITHIN * 10))); do
        if curl --silent --output /dev/null --max-time 2 "http://127.0.0.1:${port[$function]}/"; then
            ready_seconds[$function]=$(awk -v a="$began" -v b="$(date +%s.%N)" \
                'BEGIN { printf "%.1f", b - a }')
            return 0
        fi
        [[ $(podman inspect --format '{{.State.Running}}' "$name") == true ]] || return 1
        sleep 0.1
    done
    return 1
}

for function in "${FUNCTIONS[@]}"; do
    say "running the $function image as Knative would"
    if start_function "$function"; then
        record PASS "$function: first answer ${ready_seconds[$function]} s after podman run"
    else
        record FAIL "$function: did not start (log below)"
        podman logs "image-check-$function-$$" 2>&1 | tail -n 30 | indent
    fi
done

if ((failures == 0)); then
    key=$("$PY" scripts/image_check.py upload "http://127.0.0.1:${port[upload]}/" 501 \
          "$password" 2>"$work/upload-answer.log") && status=0 || status=$?
    check "upload: a station's batch answered 100 ($(tail -n 1 "$work/upload-answer.log"))" \
        test "$status" -eq 0
    if ((status)); then indent <"$work/upload-answer.log"; fi
fi
if ((failures == 0)); then
    "$PY" scripts/image_check.py notify "http://127.0.0.1:${port[writer]}/" "$token" \
        "$S3_BUCKET" "$key" >"$work/notify.log" 2>&1 && status=0 || status=$?
    check "writer: a MinIO notification with the token answered $(cat "$work/notify.log")" \
        test "$status" -eq 0
    "$PY" scripts/image_check.py written "$work/s3.env" "$key" "$work/data" \
        >"$work/written.log" 2>&1 && status=0 || status=$?
    check "writer: $(tail -n 1 "$work/written.log")" test "$status" -eq 0
fi

# --- stopping, logs --------------------------------------------------------------------

for function in "${FUNCTIONS[@]}"; do
    name="image-check-$function-$$"
    podman container exists "$name" || continue
    began=$(date +%s.%N)
    pm stop --time "$STOP_TIMEOUT" "$name" >/dev/null 2>&1 || true
    took=$(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
    check "$function: exits by itself on SIGTERM (exit code $code after $took s)" \
        awk -v t="$took" -v c="$code" -v limit="$EXIT_WITHIN" 'BEGIN { exit !(c == 0 && t < limit) }'
    podman logs "$name" >"$work/log-$function.txt" 2>&1
    bad=$(grep -cE 'ERROR|CRITICAL|Traceback' "$work/log-$function.txt" || true)
    check "$function: log without ERROR, CRITICAL or Traceback lines ($bad found; log below)" \
        test "$bad" -eq 0
    indent <"$work/log-$function.txt"
done

kill -TERM "$s3_pid" 2>/dev/null || true
wait "$s3_pid" 2>/dev/null || true
s3_pid=

# --- summary ---------------------------------------------------------------------------

sizes=()
for function in "${FUNCTIONS[@]}"; do
    bytes=$(podman image inspect --format '{{.Size}}' "$PREFIX-$function:$TAG")
    venv=$(pm run --rm --network none "${limits[@]}" --user 10001:10001 "$PREFIX-$function:$TAG" \
           du -sm /opt/venv | cut -f 1)
    sizes+=("$function $((bytes / 1000000)) MB (of which /opt/venv $venv MiB)")
done
base_mb=$(( $(podman image inspect --format '{{.Size}}' "$base") / 1000000 ))

echo
echo "== image check =="
echo "base image  $base_note, $base_mb MB"
for line in "${sizes[@]}"; do echo "image       $line"; done
echo "timings     base ${base_seconds} s, build upload ${build_seconds[upload]} s," \
     "build writer ${build_seconds[writer]} s, all $((SECONDS - started)) s"
printf '%s\n' "${results[@]}"
if ((failures)); then
    echo "image-check: FAILED ($failures of ${#results[@]} checks)"
    exit 1
fi
echo "image-check: passed (${#results[@]} checks)"
