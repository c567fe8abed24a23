"""cdc-recon: proves that the PostgreSQL tables cdc-sink writes still match Cassandra.

One module per role: canonical (pure: one form for a row on both sides, digests), readers
(Cassandra by token range, PostgreSQL by keyset), strategies (row_count, checksum,
timestamp_range, sample: comparison logic over the readers), repository (jobs and mismatches),
repair (fixes through the sink's planner and writer), service (runs a job end to end; the
runtime the sink process hosts), scheduler (the task loop), alerting (metrics and the
Pushgateway), api (HTTP routes), cli (`python -m cdc_sink reconcile`), errors.

From cdc_sink it uses the shared core only: types, tables, events/plan/write (for repair),
config, errors, and the HTTP server it adds its routes to.
"""
