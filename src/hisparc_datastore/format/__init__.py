"""The format contract, pure: what stations send and what the day files hold.

``schema`` declares every event type and HDF5 table, ``payload`` turns network pickles
into events through an allowlist, ``rows`` turns events into table rows.  Nothing here
does I/O or reads settings; everything above it builds on these.
"""
