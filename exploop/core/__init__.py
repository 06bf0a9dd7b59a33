"""The server core: the database models and the rules of the fleet (jobs, agents, leases,
credentials, throttles, the controller). Used by the API and the controller only, never by
agents or the admin CLI, which reach the platform over HTTP."""
