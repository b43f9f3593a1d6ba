"""The inference server: the batching engine, HTTP and gRPC front ends, metrics (README.md, "Serving")."""
