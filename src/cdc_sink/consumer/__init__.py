"""The consumer side: partition ownership, the fetch pipeline, preparation, the batch applier,
the retry policy and the offset mirror, composed by `cdc_sink.consumer.worker.Worker`."""
