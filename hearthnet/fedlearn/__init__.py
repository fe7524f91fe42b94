"""Federated LoRA rounds (spec M28): manifests, deltas, aggregation, privacy, rounds."""
