"""``python -m tasks.dvc_cli ARGS``: DVC's command line, run warm by the flow's stage server when there is one.

A ``dvc`` process spends about a second importing DVC before it reads the pipeline, and a flow starts seven of
them (one ``dvc repro`` per stage, then ``dvc exp save``). The stage server (``tasks.stage_server``) has
imported DVC once, so this process hands its invocation over the way a stage process does, and the child forked
for it runs ``python -m dvc ARGS`` there; the stage commands that DVC starts reach the same server. Without a
server it runs DVC itself. Output, exit status and what DVC writes are the same either way.
"""
from __future__ import annotations

import sys

from tasks import stage_server


def main(argv: list[str]) -> int:
    code = stage_server.delegate("dvc", argv)
    if code is None:
        from dvc.cli import main as dvc_main

        code = dvc_main(argv)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
