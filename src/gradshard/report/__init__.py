"""``gradshard report``: one self-contained HTML page per training run, collected from its store."""

from gradshard.report.data import NotATrainingRunError, RunReport, load_run_report

__all__ = ["NotATrainingRunError", "RunReport", "load_run_report"]
