"""Python modules generated from the ``.proto`` files under ``protos/``.

``serving.protos.graft.batching_pb2`` (BatchingParameters) and
``serving.protos.graft.ssl_config_pb2`` (SSLConfig) mirror TF Serving's config
messages field for field, so users' text files parse unchanged.
``serving.protos.inference`` is the Open Inference Protocol (V2) service; its
descriptors live in a private descriptor pool so that tritonclient's
identically named ``inference`` protos can load beside it (see
``generate.PRIVATE_POOL_DIRS``). Regenerate with ``python -m
serving.protos.generate`` (``make protos``); never edit the generated modules
by hand.
"""
