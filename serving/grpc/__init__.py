"""The gRPC adapters on one grpc.aio server: TF Serving's services and the V2 protocol."""
