"""``vqdiff serve``: the flags are server/settings.py's (``add_flags``), one per setting."""

from __future__ import annotations

import argparse

from vqdiff.server.settings import add_flags, from_args  # the standard library only: no torch yet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Every setting is a flag --x-y and a variable VQDIFF_X_Y (server/settings.py); "
                          "flags win over variables, variables over defaults.")
    parser.allow_abbrev = False  # one name per setting: --max-row is not --max-rows
    add_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from vqdiff.server.threads import set_wait_policy

    settings = from_args(args)  # bad settings fail here, before torch or the model loads
    settings.check_role()
    set_wait_policy(settings.omp_wait_policy)  # libgomp reads it once, when torch loads it: first
    from vqdiff.server.main import serve

    serve(settings)
