"""The agent side: the ``exploop-agent`` Celery worker, its bootsteps, tasks and scanners."""
