"""cdc-recon: proves that the PostgreSQL tables cdc-sink writes still match Cassandra."""
