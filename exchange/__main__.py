"""``python -m exchange --config F`` is ``zonegate exchange --config F``."""

import sys

from sidecar.cli import main

sys.exit(main(["exchange", *sys.argv[1:]]))
