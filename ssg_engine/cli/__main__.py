"""``python -m ssg_engine.cli ...``: the ``ssg-engine`` command (also what ``torchrun -m ssg_engine.cli fid-sample`` runs)."""
import sys

from . import main

sys.exit(main())
