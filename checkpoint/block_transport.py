"""Erasure-coding blocks between snapshot daemons, over plain TCP.

The blocks are a daemon's bulk traffic: every step each node streams its share to the nodes
holding its parity, and a rebuild reads k blocks per stripe. gRPC's Python path copies each
byte several times (about 0.3 GB/s here); a socket moves it straight from the segment into the
receiver's array (1.5-3 GB/s). Control stays on gRPC: a daemon's block port is in its Status.

One request per connection. The client sends a frame (a 4-byte length, then JSON) naming the
job, its token and the operation:

- `get`: {step, stripe, parity}. The daemon answers with a frame {ok, block_bytes, meta} and
  then block_bytes raw bytes.
- `put`: {step, stripe, source, block_bytes, meta}, followed by block_bytes raw bytes (a data
  block folded into the parity held here). The daemon answers {ok} once all are folded in.
- `read`: {step, rank, offset, nbytes}: bytes of a rank's committed snapshot (a restore on
  another node). The answer is a get's, with an empty meta.

A refusal is a frame {ok: false, kind, error}: `kind` is a SnapshotError's (the store refused),
or unauthenticated (a wrong token) or permission (another job).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

PIECE = 4 << 20
"""Bytes a put is folded in by, and a get is sent in."""

MAX_FRAME = 64 << 20
"""A frame is JSON: a share's description lists every buffer of the node's ranks (a few MiB for
a large model); anything past this is not one of ours."""

_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Piece:
    """One piece of a data block on its way into a parity block (what add_parity folds in)."""

    step: int
    stripe: int
    source: int
    block_bytes: int
    offset: int
    data: memoryview
    meta: bytes
    """The source's share description, with the first piece only."""


GetHandler = Callable[[dict], tuple[dict, int, Iterator[bytes | memoryview]]]
"""A get request -> (meta, block_bytes, the block's bytes in pieces: an iterator with a
`close()`, called once they are sent or abandoned); raises BlockRefused."""
PutHandler = Callable[[Piece], None]
"""Folds a piece in; raises BlockRefused."""


class BlockRefused(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class BlockServer:
    """Serves gets and puts of the daemon's job on a port of its own, a thread per connection."""

    def __init__(
        self, host: str, job: str, token: str, get: GetHandler, read: GetHandler, put: PutHandler, timeout_s: float
    ):
        self.job, self.token, self.timeout_s = job, token, timeout_s
        self.sends: dict[str, GetHandler] = {"get": get, "read": read}
        self.put = put
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, name="stalwart-blocks", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="stalwart-block", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.timeout_s)
            try:
                request = read_frame(conn)
                self._check(request)
                if request.get("op") in self.sends:
                    meta, size, pieces = self.sends[request["op"]](request)
                    with contextlib.closing(pieces):  # it may pin what it sends
                        write_frame(conn, {"ok": True, "meta": meta, "block_bytes": size})
                        for piece in pieces:
                            conn.sendall(piece)
                elif request.get("op") == "put":
                    self._receive(conn, request)
                    write_frame(conn, {"ok": True})
                else:
                    raise BlockRefused("invalid", f"unknown block operation {request.get('op')!r}")
            except BlockRefused as e:
                _answer_refusal(conn, e.kind, str(e))
            except (KeyError, TypeError, ValueError) as e:
                _answer_refusal(conn, "invalid", f"malformed block request: {e}")
            except OSError:
                pass  # the peer went away: its own call reports it

    def _check(self, request: dict) -> None:
        if not hmac.compare_digest(str(request.get("token", "")).encode(), self.token.encode()):
            raise BlockRefused("unauthenticated", "wrong or missing token")
        if request.get("job") != self.job:
            raise BlockRefused("permission", f"this daemon serves job {self.job!r}, not {request.get('job')!r}")

    def _receive(self, conn: socket.socket, request: dict) -> None:
        size = int(request["block_bytes"])
        buffer = memoryview(bytearray(min(PIECE, max(size, 1))))
        meta = json.dumps(request["meta"]).encode()
        header = (int(request["step"]), int(request["stripe"]), int(request["source"]), size)
        offset = 0
        while True:  # an empty block still gets one (empty) piece: its description
            length = min(PIECE, size - offset)
            _receive_into(conn, buffer[:length])
            self.put(Piece(*header, offset, buffer[:length], meta if offset == 0 else b""))
            offset += length
            if offset >= size:
                return

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def get_block(address: str, request: dict, timeout_s: float) -> tuple[np.ndarray, dict]:
    """A block and its description from the daemon whose block port is `address`."""
    with open_block(address, request, timeout_s) as block:
        data = np.empty(block.nbytes, np.uint8)
        _receive_into(block.conn, memoryview(data))
    return data, block.meta


class IncomingBlock:
    """A get answered: the block's description and size are in, its bytes are to be read."""

    def __init__(self, conn: socket.socket, meta: dict, nbytes: int):
        self.conn, self.meta, self.nbytes = conn, meta, nbytes

    def read_pieces(self, buffer: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, bytes) of each piece of the block, read into `buffer` (reused: each piece
        is valid until the next is asked for)."""
        for offset in range(0, self.nbytes, buffer.size):
            view = buffer[: min(buffer.size, self.nbytes - offset)]
            _receive_into(self.conn, memoryview(view))
            yield offset, view

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> IncomingBlock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_block(address: str, request: dict, timeout_s: float, op: str = "get") -> IncomingBlock:
    """Ask the daemon whose block port is `address` for a block (or, op `read`, a range of a
    rank's snapshot); its bytes follow the answer."""
    conn = socket.create_connection(_host_port(address), timeout=timeout_s)
    try:
        write_frame(conn, {**request, "op": op})
        answer = _answer(conn)
        return IncomingBlock(conn, answer["meta"], int(answer["block_bytes"]))
    except BaseException:
        conn.close()
        raise


def read_range(address: str, request: dict, out: memoryview, timeout_s: float) -> None:
    """Bytes of a rank's committed snapshot, `request`'s range, straight into `out`."""
    with open_block(address, request, timeout_s, op="read") as answer:
        if answer.nbytes != out.nbytes:
            raise ValueError(f"asked for {out.nbytes} bytes, the daemon sends {answer.nbytes}")
        _receive_into(answer.conn, out)


def put_block(address: str, request: dict, pieces: Iterable[bytes | memoryview], timeout_s: float) -> None:
    """Send a data block (`request["block_bytes"]` bytes, in `pieces`) to a parity holder."""
    with socket.create_connection(_host_port(address), timeout=timeout_s) as conn:
        write_frame(conn, {**request, "op": "put"})
        for piece in pieces:
            conn.sendall(piece)
        _answer(conn)


def _answer(conn: socket.socket) -> dict:
    answer = read_frame(conn)
    if not answer.get("ok"):
        raise BlockRefused(answer.get("kind", "invalid"), answer.get("error", "refused"))
    return answer


def _answer_refusal(conn: socket.socket, kind: str, message: str) -> None:
    try:
        write_frame(conn, {"ok": False, "kind": kind, "error": message})
    except OSError:
        pass


def write_frame(conn: socket.socket, value: dict) -> None:
    body = json.dumps(value).encode()
    conn.sendall(_LENGTH.pack(len(body)) + body)


def read_frame(conn: socket.socket) -> dict:
    head = bytearray(_LENGTH.size)
    _receive_into(conn, memoryview(head))
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"a {length}-byte frame")
    body = bytearray(length)
    _receive_into(conn, memoryview(body))
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("a frame that is not a JSON object")
    return value


def _receive_into(conn: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        n = conn.recv_into(view[received:])
        if n == 0:
            raise ConnectionError(f"the connection closed after {received} of {len(view)} bytes")
        received += n


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
