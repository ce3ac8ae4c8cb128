"""The HBT study: a grid of train-then-evaluate runs, their results, and the report (study.py).

    config.py    the study's JSON config, checked key by key, and the plan of runs
    grid.py      the grid's runs: their state, the plan, running the pending ones (locked, shared)
    progress.py  the progress line and the estimated time left for the grid
    runner.py    one run: train (minihbt.training, resumable), evaluate plain and centred, write its files
    verify.py    one finished run again from nothing, compared with its stored result
    perquery.py  the per-query ranks (.npz beside each run's JSON) and the metrics they give
    data.py      the result files as the report reads them: means over seeds, paired bootstrap
    report.py    REPORT.md from the result files alone: tables, bootstrap differences, verdicts
    verdicts.py  the paper's claims checked against the bootstrap intervals
    paper.py     the paper's own figures, set beside the study's differences
    figures.py   metric and loss-curve figures (matplotlib, optional)
"""
from .config import SettingError, load_study, select_runs

__all__ = ["SettingError", "load_study", "select_runs"]
