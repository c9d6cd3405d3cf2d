"""Data access: image folders and path lists, benchmark datasets, RecordIO."""
