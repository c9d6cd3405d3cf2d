"""Small shared helpers: console and progress output (rank 0 only), seeding."""
