"""Operator commands of the ``datastore`` CLI: sweep, status, replay, failed, import-legacy.

Each module offers ``add_arguments(parser)`` and ``run(args)``, and reads the settings at
that edge; the work itself is done by the writer's and the storage's code.
"""
