"""Training examples: the row contract, readers (synthetic Parquet, labeled JSONL), weighted mixing,
instruction formatting, task-homogeneous batching and false-negative masking."""

from ray_e5.data.batching import Plan, build_plan, plan_group, plan_source
from ray_e5.data.format import format_queries
from ray_e5.data.masking import false_negative_mask
from ray_e5.data.schema import CONTRACT, RowDefaults, normalize_record
from ray_e5.data.sources import Source, SourceError, labeled_source, read_rows, synthetic_source

__all__ = ["Plan", "build_plan", "plan_group", "plan_source", "format_queries", "false_negative_mask", "CONTRACT",
           "RowDefaults", "normalize_record", "Source", "SourceError", "labeled_source", "read_rows",
           "synthetic_source"]
