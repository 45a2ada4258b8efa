"""``labeldiff study``: the papers' label-efficiency tables on your own data, from one YAML file.

spec.py (YAML → dataclasses), configs.py (run configs and their hashes), select.py (random / diverse / typical
subsets, class coverage), runner.py (cached pretraining, cells, resume, progress), report.py (tables,
paired differences, plots as pure functions on rows), prepare.py (data hooks, environment.json).
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "run_study":  # imported on use: the runner pulls in torch and MONAI
        from labeldiff.study.runner import run_study

        return run_study
    raise AttributeError(name)


__all__ = ["run_study"]
