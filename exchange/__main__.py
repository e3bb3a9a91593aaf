"""``python -m exchange --config F`` is ``zonegate exchange --config F``."""

import sys

from exchange.server.app import main
from runtime.program import run_program

sys.exit(
    run_program("python -m exchange", "run the standalone exchange server", main, sys.argv[1:])
)
