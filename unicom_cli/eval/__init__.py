"""Exact search and retrieval/kNN metrics as pure functions."""
