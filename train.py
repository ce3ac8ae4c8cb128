"""Train a multilingual dense retriever with hybrid batches (HBT).

Not implemented yet: the samplers, the data readers and the training loop land with the
training issue. What works today is the encoder (`minihbt.load_model`, `minihbt.encode`).
"""
import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet (see README.md, 'Status'). "
             "The encoder API works: python -c 'import minihbt; help(minihbt.encode)'")
