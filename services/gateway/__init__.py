"""The OpenAI-compatible HTTP gateway over the router (``chiron gateway``): :mod:`services.gateway.app`."""
