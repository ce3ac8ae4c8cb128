"""Check another implementation of HBT against minihbt: `python -m minihbt.check SUBCOMMAND`.

    batches   check a batch log (one JSON line per batch) against HBT's batch rules
    log       write minihbt's own batches as a batch log: the reference a log is compared with
    metrics   score another implementation's embeddings with minihbt's retrieval and metrics,
              write the order of the texts to embed, or write hand-made metric cases
    export    write a golden bundle of one training step: the batch, every intermediate tensor,
              every gradient and the parameters after one AdamW step, with tolerances
    step      compare another implementation's tensors of that step with the bundle and name
              the first tensor out of tolerance

docs/check-your-implementation.md walks through them; docs/batch-log.md is the log's schema;
bundle.py the bundle's layout and tensor names.
The dispatcher (__main__.py) holds the table of subcommands; each lives in its own module
with a `main(argv)` that returns the exit status.
"""
