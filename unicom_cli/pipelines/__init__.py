"""End-to-end jobs built from models, data and eval: embed, retrieval, kNN, demo."""
