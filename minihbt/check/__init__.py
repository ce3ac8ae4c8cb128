"""Check another implementation of HBT against minihbt: `python -m minihbt.check SUBCOMMAND`.

    batches   check a batch log (one JSON line per batch) against HBT's batch rules
    log       write minihbt's own batches as a batch log: the reference a log is compared with
    metrics   score another implementation's embeddings with minihbt's retrieval and metrics,
              write the order of the texts to embed, or write hand-made metric cases

docs/check-your-implementation.md walks through them; docs/batch-log.md is the log's schema.
The dispatcher (__main__.py) holds the table of subcommands; each lives in its own module
with a `main(argv)` that returns the exit status.
"""
