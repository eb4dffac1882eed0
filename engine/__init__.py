"""filtergate's engine: server, router, filter chain, upstream pools. No plugin logic."""

__version__ = "0.1.0"
