"""Celery workers: one process per GPU (or one CPU worker) running the surgery loop."""
