"""Helpers shared by the tests (the doubles they run against are in tests/fakes/; fixtures are in conftest files).

api: keys, the bearer header, a chat request (or many at once), the app with every router · artifact: the built
Lambda's settings and tokens · aws_lambda: Lambda contexts, HTTP API events, the API handler cold-started ·
billing: the billing harness (`Billing`) · cli: the `aikit` command as a user runs it · db: test databases · emf:
EMF records · hostile: an API with billing on and the leak check · meters: an in-memory Meter · proxy: the API in
front of the fake OpenAI · redis: what the API left in Redis · redis_faults: helpers of the Redis fault tests ·
served: `aikit serve` watched over sockets · servers: the API under uvicorn, redis-server processes, a Redis
Cluster · settings: `make_settings` · template: template.yaml · webhooks: signed Stripe events.
"""
