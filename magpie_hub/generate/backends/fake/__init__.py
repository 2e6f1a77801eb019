"""Backends without a model: ``dummy`` (deterministic fake text, injected faults) and ``scripted`` (JSONL answers)."""
