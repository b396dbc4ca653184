"""dsdnode: one LLM across volunteer machines, fast over slow links via speculative decoding.

Library API (see dsdnode.client.library): `dsdnode.connect(model, local=True | bootstrap=[...])`
returns a client with generate() and stream(); `await dsdnode.connect_async(...)` the asyncio form."""

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "GenerateOptions", "Generation", "connect", "connect_async", "__version__"]


def __getattr__(name: str):
    """The library API, imported on first use (torch and transformers take seconds to import, and
    `dsdnode --help` should not wait for them)."""
    if name in ("AsyncClient", "Client", "connect", "connect_async"):
        from .client import library
        return getattr(library, name)
    if name in ("GenerateOptions", "Generation"):
        from .client import service
        return getattr(service, name)
    raise AttributeError(f"module 'dsdnode' has no attribute {name!r}")
