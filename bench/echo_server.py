"""The control benchmark's floor: a trivial anyio JSON-lines server on a Unix socket.

It speaks the daemon's framing (one request object a line, ``{"id", "ok", "result"}`` back)
and does the least any such server must: read a line, parse it, serialise an answer, send
it. ``ping`` answers ``{"pong": true}``; a command found in the ``--canned`` file (the
daemon's own ``status`` and ``stats`` answers, captured in the same run) answers that
document, serialised afresh each time as the daemon must. Whatever the daemon takes beyond
this server is its own overhead.

    python -m bench.echo_server --socket PATH [--canned FILE]   prints "ready" once listening
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

MAX_LINE_BYTES = 1024 * 1024


async def answer(canned: dict[str, Any], stream: SocketStream) -> None:
    buffered = BufferedByteReceiveStream(stream)
    async with stream:
        while True:
            try:
                line = await buffered.receive_until(b"\n", MAX_LINE_BYTES)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                return
            request = json.loads(line)
            cmd = request.get("cmd")
            result = canned.get(cmd, {"pong": True})
            response = {"id": request.get("id"), "ok": True, "result": result}
            await stream.send((json.dumps(response) + "\n").encode())


async def serve(path: Path, canned: dict[str, Any]) -> None:
    listener = await anyio.create_unix_listener(path)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    async with listener:
        await listener.serve(partial(answer, canned))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.echo_server", description=__doc__)
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--canned", type=Path)
    args = p.parse_args(argv)
    canned = json.loads(args.canned.read_text()) if args.canned else {}
    anyio.run(serve, args.socket, canned)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
