"""Where the data lives: the bucket (objects and their keys) and the daily HDF5 files."""
