"""API Lambda: the FastAPI app behind API Gateway (HTTP API), through Mangum."""

from mangum import Mangum

from aikit.api.app import create_app
from aikit.aws_secrets import apply_secret_settings
from aikit.observability import lambda_entry

apply_secret_settings()
app = create_app()
handler = lambda_entry(Mangum(app, lifespan="off"))
