"""`python -m pscv ...` runs the `pscv` command line (how the client starts `python -m pscv worker JOB_DIR`)."""

import sys

from .cli import main

sys.exit(main())
