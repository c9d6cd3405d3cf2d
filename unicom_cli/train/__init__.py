"""Finetuning: Partial FC margin loss and the training loop."""
