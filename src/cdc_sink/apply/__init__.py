"""Events into PostgreSQL: the pure merge plan and the writer (COPY, upsert, deletes)."""
