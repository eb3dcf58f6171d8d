"""Development tools of the HiSPARC datastore, kept out of the function images.

``local`` runs the whole stack on one machine (``datastore local``), ``simulate`` behaves
like a station (``datastore simulate``), ``samples`` makes realistic events, ``py2pickle``
writes the Python 2 pickles old stations send, ``s3server`` runs SeaweedFS on loopback and
``processes`` starts and stops served functions (for the local stack, tests and benchmarks).
"""
