"""The HTTP layer: FastAPI routes, request schemas, authentication, rate limits, metrics, uploads.

A route parses the request, calls a use case of the service core (``service.usecases``) and
returns a schema. Uploads are judged by content with the engine's format checks (``dns_core``),
which never run a received model; the training itself happens in the workers, reached by task
name through the queue.
"""
