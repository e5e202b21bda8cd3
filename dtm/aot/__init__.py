"""Ahead-of-time cost of a job: compile for a TPU slice, a GPU kind or N CPU devices,
print bytes per device, FLOPs and estimated time (`main.py --dry_run=TARGET`)."""
from dtm.aot.architectures import ARCHITECTURES, architecture
from dtm.aot.compile import Fn, Row, check_fit, compile_all, table
from dtm.aot.dry_run import job_plan, local_target, run
from dtm.aot.targets import Target, parse_target

__all__ = ["ARCHITECTURES", "architecture", "Fn", "Row", "check_fit", "compile_all", "table",
           "job_plan", "local_target", "run", "Target", "parse_target"]
