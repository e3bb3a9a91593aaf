"""Developer tools run by ``make test`` (not part of the installed product)."""
