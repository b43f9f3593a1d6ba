"""The inference server (batching engine, HTTP, gRPC, metrics): see issue 5."""
