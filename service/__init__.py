"""The service core that the HTTP layer (``api``) and the workers (``worker``) share.

Settings, the ORM and its engines, the repositories (every SQL statement, the job state machine
among them), the storage-key layout and the blob store, the queue, the quotas and the use cases.
It imports neither FastAPI nor torch: the HTTP layer parses and renders around it, the worker runs
the engine (``dns_core``) beside it.
"""
