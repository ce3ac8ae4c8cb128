"""Evaluate a retriever on XQuAD-R / MLQA-R (mAP, recall, language bias).

Not implemented yet: retrieval and metrics land with the evaluation issue.
"""
import sys

if __name__ == "__main__":
    sys.exit("evaluate.py: evaluation is not implemented yet (see README.md, 'Status').")
