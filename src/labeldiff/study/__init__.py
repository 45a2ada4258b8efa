"""``labeldiff study``: the papers' label-efficiency tables on your own data, from one YAML file.

spec.py (YAML → dataclasses), configs.py (run configs and their hashes), prepare.py (data hooks, the
split, environment.json), select.py (random / diverse / typical subsets, class coverage), plan.py (the
pretraining runs and cells a study makes), execute.py (training, resuming and scoring them, in one process
or several), runner.py (``run_study``: the order of things and the study folder), stats.py (mean ± std,
paired differences and their t intervals), report.py (results.csv and the tables), verdict.py
(verdict.md), plots.py (the figures), html_report.py (report.html: all of it in one page, with an overlay
viewer), pages.py (a study folder's README.md).
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "run_study":  # imported on use: the runner pulls in torch and MONAI
        from labeldiff.study.runner import run_study

        return run_study
    raise AttributeError(name)


__all__ = ["run_study"]
