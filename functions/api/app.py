"""API Lambda: the FastAPI app, served two ways (template.yaml, ApiStreaming):
- streaming (REST API): run.sh execs uvicorn with `app:asgi` behind Lambda Web Adapter, which streams;
- buffered (HTTP API): `app.handler`, through Mangum."""

import gc

from mangum import Mangum

from aikit.api.app import create_app
from aikit.aws_secrets import apply_secret_settings, refresh_after_snapstart_restore
from aikit.observability import asgi_entry, lambda_entry

apply_secret_settings()
refresh_after_snapstart_restore()
app = create_app()
handler = lambda_entry(Mangum(app, lifespan="off"))
asgi = asgi_entry(app)
gc.freeze()  # what start-up built lives as long as the instance: out of the collector's way (as `aikit serve`)
