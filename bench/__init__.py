"""covergate's load harness: covergate against a no-op gRPC ceiling, its own pure-Python reference,
more workers and a conventional stack, side by side in one run (`make bench`, `python -m bench`).

What is measured: `scenarios` (calls and mixes), `variants` (servers: name, command, environment),
`plan` (comparisons, open-loop points, goals). How: `dataset` (the cached store and sampled
identities), `frames` (pre-encoded gRPC requests and expected answers), `h2load` and
`stream_client` (load), `probe` (grpc-status checks), `micro` (in-process fast-path and import
rates), `servers`, `workers`, `noop_server` and `conventional_server` (processes and baselines).
Then `stats` and `report` (medians, ratios, goals, tables, JSON, plots); `run` ties them together.
On their own: `warmup` (the first seconds after start, with and without `[store] prefault`).
"""
