#!/bin/sh
# The image's entrypoint, run by tini (PID 1, which forwards SIGTERM and reaps).
#   <no arguments>            shmserve serve on /models (tritonserver's default ports)
#   serve|shm|... ARGS        shmserve ARGS
#   tritonserver ARGS, --FLAG ARGS
#                             shmserve serve ARGS: KServe's and Triton's own command lines
#                             (--model-store=/mnt/models --grpc-port=9000 ...) as they are
#   healthcheck [URL]         exit 0 when the server's /v2/health/ready answers 200
# `exec` replaces this shell, so the server is tini's child and gets its signals.
set -eu
if [ "$#" -eq 0 ]; then
    set -- serve --model-repository="${SHMSERVE_MODEL_REPOSITORY:-/models}"
fi
case "$1" in
    tritonserver)
        shift
        exec shmserve serve "$@" ;;
    -h|--help|--version)
        exec shmserve "$@" ;;
    -*)
        exec shmserve serve "$@" ;;
    healthcheck)
        shift
        exec python3 -c '
import sys, urllib.request
url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v2/health/ready"
try:
    status = urllib.request.urlopen(url, timeout=3).status
except Exception as exc:
    sys.exit(f"not ready: {exc}")
sys.exit(0 if status == 200 else f"not ready: HTTP {status}")
' "$@" ;;
    *)
        exec shmserve "$@" ;;
esac
