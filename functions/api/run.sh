#!/bin/sh
# The API function's entry with ApiStreaming=true: Lambda Web Adapter (AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap)
# runs this script, waits until GET $AWS_LWA_READINESS_CHECK_PATH on $PORT answers, then forwards every
# invocation to it as an HTTP request and streams the response back (AWS_LWA_INVOKE_MODE=response_stream).
# The aikit layer is on the path as for any handler; unbuffered output so logs and metrics leave at once.
set -eu
cd "$(dirname "$0")"
export PYTHONPATH="/opt/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 -m uvicorn app:asgi --host 127.0.0.1 --port "${PORT:-8080}" --no-access-log --no-server-header \
  --log-level warning --lifespan off --timeout-keep-alive 75
