"""Local stand-ins for model hubs, for tests (standard library only).  A mirror for machines
without internet is ``ckpt mirror export|serve`` (docs/mirror.md): a static tree any web server
can serve.

* :class:`TFHubStub`, :class:`KaggleStub` — in-memory tfhub.dev (compressed protocol) and
  Kaggle Models API, for tests that publish bytes and assert on the requests
  (:mod:`ckptkit.testing.stubs`).
* :class:`MirrorServer` — a whole mirror directory (plain files, TF Hub handles, Kaggle model
  versions) on one port, optionally with prefixes that are "down"
  (:mod:`ckptkit.testing.mirror`).

Run the mirror from a shell::

    python -m ckptkit.testing.hubs ROOT [--port N] [--down PREFIX ...] [--down-mode 503|close]

It prints ``serving ROOT on http://127.0.0.1:PORT`` (one line, flushed) and serves until
SIGTERM or SIGINT, then exits 0.

Example:
    >>> with MirrorServer(root) as server:                              # doctest: +SKIP
    ...     tfhub.fetch("https://tfhub.dev/google/musiq/spaq/1", dest,
    ...                 mirrors=Mirrors.parse(f"https://tfhub.dev={server.base}/tfhub"),
    ...                 tfhub_cache_dir=None)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ckptkit.testing.mirror import MirrorServer
from ckptkit.testing.server import (Logged, StubHandler, StubServer, entry_point_parser,
                                    parse_range, serve_until_signalled)
from ckptkit.testing.stubs import (FRAMEWORKS, KaggleModel, KaggleRpcHandler, KaggleStub,
                                   TFHubStub, archive_of, tfhub_archive, tree_files)

__all__ = ["FRAMEWORKS", "KaggleModel", "KaggleRpcHandler", "KaggleStub", "Logged",
           "MirrorServer", "StubHandler", "StubServer", "TFHubStub", "archive_of", "main",
           "parse_range", "tfhub_archive", "tree_files"]

EXAMPLES = """\
examples:
  python -m ckptkit.testing.hubs mirror/ --port 8000
  python -m ckptkit.testing.hubs mirror/ --down /tfhub        # TF Hub answers 503
  ckpt fetch musiq-spaq --mirror https://tfhub.dev=http://127.0.0.1:8000/tfhub,\\
https://api.kaggle.com=http://127.0.0.1:8000/kaggle
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a mirror directory until SIGTERM or SIGINT; returns the exit code.

    Must run in the main thread (it installs signal handlers, restored on return).
    """
    parser = entry_point_parser(
        "ckptkit.testing.hubs", "Serve ROOT/files, ROOT/tfhub and ROOT/kaggle on 127.0.0.1 "
        "(one port) for --mirror rules.", EXAMPLES, root_help="the mirror directory",
        port_help="port to listen on (default 0: any free port, printed)")
    parser.add_argument("--down", action="append", default=[], metavar="PREFIX",
                        help="a path prefix that fails, e.g. /tfhub (repeatable)")
    parser.add_argument("--down-mode", choices=["503", "close"], default="503",
                        help="how a down prefix fails: answer 503, or close the connection")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    return serve_until_signalled(
        lambda: MirrorServer(args.root, port=args.port, down=args.down, down_mode=args.down_mode,
                             verbose=args.verbose, record=False),
        lambda server: f"serving {args.root} on {server.base}", f"127.0.0.1:{args.port}")


if __name__ == "__main__":
    sys.exit(main())
