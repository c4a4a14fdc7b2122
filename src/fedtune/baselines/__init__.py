"""`fedtune bench`: local-only, federated and centralised training on one split and one budget,
with a results table and an HTML report (docs/bench.md). The entry point is `runner.bench`
(`fedtune.bench` from Python)."""
