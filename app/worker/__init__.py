"""The Celery glue: thin tasks, their shared base, the router, the beat scheduler."""
