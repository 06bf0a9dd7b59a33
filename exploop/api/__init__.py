"""HTTP API: one blueprint per audience (platform agents, tenants, admins)."""
