"""Leaderboard reports from lm-eval outputs: tables, figures and paired significance tests."""

from medmerge.report.build import build_report

__all__ = ["build_report"]
