"""The ``datastore`` command: one sub-command per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .config import ConfigError

#: sub-command -> (module that implements it, one-line help).  Each module provides
#: ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("hisparc_datastore.sweep", "write every object under incoming/ into HDF5"),
    "status": ("hisparc_datastore.status", "objects per prefix, newest write, daily files"),
    "local": ("hisparc_datastore.local", "run the embedded local stack (S3 + both functions)"),
    "simulate": ("hisparc_datastore.simulate", "behave like a station: upload batches"),
    "replay": ("hisparc_datastore.replay", "rebuild day files from archive/ into a directory"),
    "import-legacy": ("hisparc_datastore.legacy",
                      "put a reference datastore's queue folders into the bucket"),
    "failed": ("hisparc_datastore.failed", "list, inspect and retry quarantined objects"),
    "serve": ("hisparc_datastore.serve",
              "serve a function under gunicorn with the datastore's limits (as the images do)"),
}


def build_parser(load: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datastore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if load is None or name in load:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [word for word in argv if word in COMMANDS][:1]
    parser = build_parser(load=wanted or [])
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except ConfigError as exc:
        print(f"datastore: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
