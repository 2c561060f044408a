"""Evaluation: metrics, the reconstruction protocol, reports."""
