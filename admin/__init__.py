"""``exploop-admin``: the admin CLI, an HTTP client of ``/admin/v1``."""
