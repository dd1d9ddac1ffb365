"""``python -m ssg_engine.training``: not a command; says where the training command is."""
from ..validation import refuse_module_run

refuse_module_run("ssg_engine.training", "train")
