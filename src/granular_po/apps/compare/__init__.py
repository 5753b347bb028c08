"""`granular-po compare`: arms x learning rates x seeds from one SFT model, on a synthetic task or your data.

The package, in the one direction its modules import each other (checked by import-linter):
`settings` (what a comparison is: settings, arms, runs) <- `runs` (one run as `granular-po train` runs it)
<- `grid` (train, choose, score, resume; with `metrics`, what is measured on the test pairs) <- `report`
(with `statistics` and `plots`) <- `cli` (the command line). See `cli` for the commands.
"""

from granular_po.apps.compare.cli import (
    build_parser,
    file_data,
    main,
    make_data,
    settings_from_args,
    split_file,
)
from granular_po.apps.compare.grid import Grid, pick
from granular_po.apps.compare.runs import common_overrides, run_overrides, sft_model_dir, sft_overrides
from granular_po.apps.compare.settings import (
    Arm,
    CompareSettings,
    Run,
    cell_label,
    default_arms,
    grid_runs,
    paired_arms,
    parse_arm,
    read_arms,
)

__all__ = ["Arm", "CompareSettings", "Grid", "Run", "build_parser", "cell_label", "common_overrides", "default_arms",
           "file_data", "grid_runs", "main", "make_data", "paired_arms", "parse_arm", "pick", "read_arms",
           "run_overrides", "settings_from_args", "sft_model_dir", "sft_overrides", "split_file"]
