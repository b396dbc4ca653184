"""`dsdnode api`: an OpenAI-compatible HTTP server whose every request is a session on the swarm.

schemas: the OpenAI wire format; engine: one request's generation (chain, drafter, stop strings);
server: routes, errors and server-sent events (FastAPI on uvicorn)."""
