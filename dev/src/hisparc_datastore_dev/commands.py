"""The development tools' sub-commands of ``datastore`` (an entry point of this package)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "local": ("hisparc_datastore_dev.local",
              "run the whole datastore on this machine: S3 server and both functions"),
    "simulate": ("hisparc_datastore_dev.simulate",
                 "behave like stations: upload realistic batches"),
}
