"""covergate service: gRPC server, authentication, store, importer, quotas, telemetry, config, CLI.

One module per concern; `fastpath` holds the per-request decision."""
