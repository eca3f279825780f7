"""covergate service: gRPC server, authentication, store, importer, telemetry, configuration, CLI."""
