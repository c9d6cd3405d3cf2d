"""Pipelines: the work behind each command, built from models, data, eval and distributed."""
