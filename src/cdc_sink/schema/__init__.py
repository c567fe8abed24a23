"""Target tables: their plan, the catalog that creates and evolves them, Cassandra's schema."""
