"""Graft's inference service: TF-Serving-compatible gRPC and REST over a versioned model repository."""

__version__ = "0.1.0"
