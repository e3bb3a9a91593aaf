"""``python -m sidecar --config F`` is ``zonegate sidecar --config F``."""

import sys

from sidecar.cli import main

sys.exit(main(["sidecar", *sys.argv[1:]]))
