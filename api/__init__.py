"""The netsurgery web service: settings, data model, repository and (later) the HTTP routes.

Nothing here imports the training code in ``dns_core``; the service persists, validates and
enqueues, and the workers do the surgery.
"""
