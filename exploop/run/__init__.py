"""The ``exploop`` command: the API under gunicorn, the controller, database upkeep, and the
whole local stack (``exploop up``) as child processes."""
