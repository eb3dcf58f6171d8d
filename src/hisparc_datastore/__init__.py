"""HiSPARC datastore functions: station uploads into a bucket, bucket into daily HDF5 files."""

__version__ = "0.1.0"
