"""dsdnode: one LLM across volunteer machines, fast over slow links via speculative decoding."""

__version__ = "0.1.0"
