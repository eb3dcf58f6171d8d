"""The writer function's core.

``notifications`` reduces any bucket notification to keys, ``pipeline`` writes objects
into the day files exactly once (a notification's keys, or a sweep of ``incoming/``),
``retries`` keeps the records of what waits and why, and ``service`` is the serving
process: backlog, background sweeps, liveness.  ``functions/writer/main.py`` adapts HTTP
to it.
"""
