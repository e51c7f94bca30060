"""Measuring how far a candidate driver drifts from a reference: metrics, prompts, the compare harness."""
