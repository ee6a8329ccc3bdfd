"""A deadline on every read from a client, so a client that stalls in the middle of a request cannot hold a thread.

gunicorn's gthread worker waits off the thread pool for a new connection's first bytes, but once a request has
begun it reads the rest of the headers and the body on a blocking socket with no timeout. A camera that loses power
mid-upload (no FIN, no RST ever arrives) then holds its thread until the process ends, and GATEWAY_WORKERS x
GATEWAY_THREADS such clients stop the gateway, /healthz included.

SO_RCVTIMEO set on the listening socket is copied by Linux to every connection accepted from it, and it survives
gunicorn's `setblocking(True)`, which clears any Python-level socket timeout. A read that waits longer fails with
EAGAIN: in the headers gunicorn closes the connection; in the body werkzeug raises ClientDisconnected, which
`gateway.errors` answers with 408 `client_timeout`.
"""
from __future__ import annotations

import logging
import socket
import struct
from typing import Mapping


def set_read_timeout(sock: socket.socket, seconds: float) -> None:
    """Give `sock` a per-read timeout (on a listening socket: for every connection it accepts); 0 means none."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", whole, int(round((seconds - whole) * 1_000_000))))


def read_timed_out(error: BaseException) -> bool:
    """Whether `error` came, directly or as the cause of another error, from a read that ran out of time."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (BlockingIOError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def stop_reading(environ: Mapping) -> None:
    """Shut the read side of this request's connection: what is left of the body is not coming.

    The body drain and gunicorn's parser of the next request then find the end of the stream at once instead of
    waiting out the timeout again; the answer is still written, and the connection closes after it.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:  # the client has gone already
        pass


class ReadTimeoutLogFilter(logging.Filter):
    """gunicorn logs a read that timed out in the headers as an error with a traceback; it is the client's stall.

    Such a record becomes one warning line without the traceback; every other record passes unchanged.
    """

    def __init__(self, timeout_s: float):
        super().__init__()
        self.timeout_s = timeout_s

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and read_timed_out(record.exc_info[1]):
            record.msg, record.args = "a client sent nothing for %g s in the middle of its request headers; closed", (
                self.timeout_s,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True
