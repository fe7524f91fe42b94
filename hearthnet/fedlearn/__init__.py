"""Federated LoRA rounds (docs/architecture.md): manifests, deltas, aggregation, privacy, rounds."""
