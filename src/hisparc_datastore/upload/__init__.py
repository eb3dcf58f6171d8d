"""The upload function's core: the stations' protocol, answer for answer (``protocol``).

``functions/upload/main.py`` adapts HTTP to it.
"""
