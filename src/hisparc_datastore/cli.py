"""The ``datastore`` command: the operators' tools, and the developers' where installed.

Each sub-command is a module with ``add_arguments(parser)`` and ``run(args) -> int``; only
the one that runs is imported.  The development tools (``local``, ``simulate``) come from
the separate ``hisparc-datastore-dev`` distribution, which registers them under the entry
point group ``hisparc_datastore.commands``; the function images do not install it, so
their ``datastore`` lists only what runs there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points

from hisparc_datastore.config import ConfigError

#: sub-command -> (module that implements it, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("hisparc_datastore.ops.sweep", "write every object under incoming/ into HDF5"),
    "status": ("hisparc_datastore.ops.status",
               "objects per prefix, why objects wait, newest write, day files"),
    "replay": ("hisparc_datastore.ops.replay",
               "rebuild day files from archive/ into a directory"),
    "import-legacy": ("hisparc_datastore.ops.import_legacy",
                      "put a reference datastore's queue folders into the bucket"),
    "failed": ("hisparc_datastore.ops.failed", "list, inspect and retry quarantined objects"),
    "serve": ("hisparc_datastore.serve",
              "serve a function under gunicorn with the datastore's limits (as the images do)"),
}
PLUGIN_GROUP = "hisparc_datastore.commands"


def all_commands() -> dict[str, tuple[str, str]]:
    """The built-in commands and those other installed distributions register."""
    commands = dict(COMMANDS)
    for entry in entry_points(group=PLUGIN_GROUP):
        table: Mapping[str, tuple[str, str]] = entry.load()
        commands.update(table)
    return commands


def build_parser(load: Sequence[str] | None = None,
                 commands: Mapping[str, tuple[str, str]] | None = None
                 ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datastore",
        description="The HiSPARC datastore's command line: write, inspect and repair what "
                    "the upload and writer functions keep.  `datastore COMMAND --help` "
                    "describes each command.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in (commands or all_commands()).items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if load is None or name in load:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = all_commands()
    wanted = [word for word in argv if word in commands][:1]
    parser = build_parser(load=wanted or [], commands=commands)
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
