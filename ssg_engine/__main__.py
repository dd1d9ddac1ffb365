"""``python -m ssg_engine ...``: the ``ssg-engine`` command."""
import sys

from .cli import main

sys.exit(main())
