"""Running the worker: HTTP, metrics, logs, traces, Vault, pools, housekeeping, migrations."""
