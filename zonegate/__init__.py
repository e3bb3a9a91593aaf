"""The ``zonegate`` command: every program and tool behind one CLI."""
