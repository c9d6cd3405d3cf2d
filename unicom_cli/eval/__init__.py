"""Evaluation: exact search, retrieval metrics, kNN classification."""
