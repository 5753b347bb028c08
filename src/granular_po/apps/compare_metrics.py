"""The old path of `granular_po.apps.compare.metrics`, kept because docs/results/decisive's scripts and plan
name it (`compare_metrics.forced_item` / `forced_margins`); new code imports the package's module."""

from granular_po.apps.compare.metrics import (  # noqa: F401 - re-exported
    TestScorer,
    encode_pairs,
    forced_item,
    forced_margins,
    mean_of,
    preference_metrics,
    response_logps,
    rouge_l,
    sequence_logps,
    worked_steps,
)
