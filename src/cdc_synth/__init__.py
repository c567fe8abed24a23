"""cdc-synth: synthetic Debezium Cassandra change events and the pipeline demo (`make demo`).

A development tool beside the runtime package, not part of the wheel: tests and benchmarks use
the generator, the demo runs a sink worker on the local stack. It imports cdc_sink, never the
reverse.
"""
