"""``python -m ssg_engine.eval``: not a command; says where the evaluation commands are."""
from ..validation import refuse_module_run

refuse_module_run("ssg_engine.eval", "eval", "fid-sample")
