"""``python -m tests.e2e.poison_worker serve --role worker ...``: the ``vqdiff`` command with one change:
a request whose prompt is ``POISON`` kills the process (exit status 137, as after SIGKILL) when the
engine is handed it: a job that kills every worker that runs it, with no hook in the server."""

from __future__ import annotations

import os
import sys

from vqdiff.server import engine

POISON = "the poison triangle"

_submit = engine.Engine.submit


def _deadly_submit(self, req):
    if req.prompt == POISON:
        os._exit(137)
    return _submit(self, req)


engine.Engine.submit = _deadly_submit

if __name__ == "__main__":
    from vqdiff.cli import main

    sys.exit(main(sys.argv[1:]))
