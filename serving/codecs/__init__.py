"""Wire formats <-> numpy, shared by the protocol adapters: TF Serving JSON, dense JSON
arrays, TensorProto, image bytes, and the V2 (Open Inference Protocol) data plane."""
