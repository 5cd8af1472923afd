"""Evaluation: sampling-based accuracy metrics, reports, tables and plots."""
from bridge.evaluation.metrics import avg_at_k, maj_at_k, pass_at_k
from bridge.evaluation.report import gather_table, results_markdown, write_results
from bridge.evaluation.runner import evaluate
