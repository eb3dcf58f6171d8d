"""Development tools of the HiSPARC datastore, kept out of the function images.

``local`` runs the whole stack on one machine (``datastore local``), ``simulate`` behaves
like a station (``datastore simulate``), ``samples`` makes realistic events from
``electronics`` (a station's ADC traces and trigger) and ``showers`` (air showers over the
demo stations), ``analysis`` runs HiSPARC's SAPPHiRE over the day files, ``py2pickle``
writes the Python 2 pickles old stations send, ``s3server`` runs SeaweedFS on loopback and
``processes`` starts and stops served functions (for the local stack, tests and benchmarks).
"""
