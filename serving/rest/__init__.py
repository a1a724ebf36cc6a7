"""The REST adapters on one ASGI app: TF Serving's /v1 API, the V2 protocol, health and metrics."""
