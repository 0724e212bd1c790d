"""The ``tapflow`` command line: ``tapflow run|status|add|remove|info|tail`` (see main.py)."""
