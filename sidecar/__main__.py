"""``python -m sidecar --config F`` is ``zonegate sidecar --config F``."""

import sys

from runtime.program import run_program
from sidecar.app import main

sys.exit(run_program("python -m sidecar", "run the sidecar proxy", main, sys.argv[1:]))
