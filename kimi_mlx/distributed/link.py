"""The ranks' connection: MLX's distributed group, used as a one-way ring 0 -> 1 -> ... -> N-1 -> 0.

Everything travels as mx.distributed.send / recv between ring neighbours (the only pairs the ring
backend connects): command headers, hidden states, and "blobs" (JSON plus arrays) for handshakes
and saved sessions. No network code of our own.

A peer that dies must not leave the others hanging. MLX's ring backend waits on its sockets
forever when a peer is gone (and spins a core while it waits), so with the ring backend this module
finds the group's sockets (the file descriptors connected to the hostfile's neighbour addresses)
and waits for incoming data itself with select(): no CPU is burnt while a rank idles, a closed
connection (a dead process: its kernel closes it) is seen at once and raised as PeerLost, and a
deadline raises PeerTimeout. MLX's recv is issued only once data is there. A watchdog thread covers
the sends (an MLX call the main thread can't leave): a closed connection or a deadline while one is
in progress ends the process with a one-line message. Backends without sockets (JACCL) keep the
watchdog's deadline only.
"""
from __future__ import annotations

import json
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from typing import Optional

import mlx.core as mx
import numpy as np

# how long a rank waits for data it is owed in the middle of work (a forward pass, a session
# transfer) before it gives up on a peer that is alive but silent (a cut cable sends no close)
DEFAULT_TIMEOUT = 600.0
_DTYPES = [mx.float32, mx.bfloat16, mx.float16, mx.int32, mx.uint32, mx.uint8, mx.int64, mx.int8, mx.uint16]


class PipelineError(RuntimeError):
    """The pipeline can't go on (the message is one line, ready to show). quiet: every rank found the
    same (e.g. a bad --split), and rank 0 says it."""

    quiet = False


class PeerLost(PipelineError):
    pass


class PeerTimeout(PipelineError):
    pass


def dtype_code(dtype) -> int:
    return _DTYPES.index(dtype)


def code_dtype(code: int):
    return _DTYPES[code]


def launched() -> bool:
    """True in a process started by mlx.launch (or by hand with MLX's variables) as one of several ranks."""
    if "MLX_RANK" not in os.environ:
        return False
    if os.environ.get("MLX_HOSTFILE"):
        return True
    return any(k in os.environ for k in ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES", "MLX_WORLD_SIZE"))


def quiet_launcher_relay() -> bool:
    """Stop mlx.launch's relay from spinning on this rank's stdin; True when it was done.

    mlx.launch gives every rank a stdin pipe and select()s on the pipe's write end to forward its
    own input, and an empty pipe is always writable: each rank's relay thread busy-loops, more than
    a core between them (a 2-core machine decoded at 0.6x speed). A full pipe is not writable, so
    the relay sleeps in select(). Only for a rank that never reads stdin (the launcher never closes
    it: a read would wait forever anyway), only for a pipe, and only where a pipe can be opened for
    writing through /proc (Linux); elsewhere nothing happens."""
    try:
        if not stat.S_ISFIFO(os.fstat(0).st_mode):
            return False
        fd = os.open("/proc/self/fd/0", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                if os.write(fd, chunk) == 0:
                    break
            except BlockingIOError:  # full
                return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _hostfile_nodes() -> Optional[list[list[tuple[str, int]]]]:
    """The ring hostfile (one list of "ip:port" per rank), None when there is none."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        with open(path) as f:
            nodes = json.load(f)
        out = []
        for node in nodes:
            out.append([(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in node])
        return out
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return None  # a JACCL file or something else: no socket discovery


def _open_fds() -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:  # macOS: no /proc
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return list(range(min(soft if soft > 0 else 4096, 4096)))


def _addr(a) -> tuple[str, int]:
    return (a[0], int(a[1]))


def _same_host(a: str, b: str) -> bool:
    try:
        return socket.gethostbyname(a) == socket.gethostbyname(b)
    except OSError:
        return a == b


def find_ring_sockets(rank: int, size: int) -> Optional[tuple[list[socket.socket], list[socket.socket]]]:
    """(left, right): dup'ed socket objects of the ring group's connections to the left neighbour
    (accepted on this rank's own hostfile addresses) and to the right one (connected to its
    addresses). None unless both are found (not the ring backend, or an unexpected layout)."""
    nodes = _hostfile_nodes()
    if not nodes or len(nodes) != size:
        return None
    mine = {(h, p) for h, p in nodes[rank]}
    right_addrs = {(h, p) for h, p in nodes[(rank + 1) % size]}
    left, right = [], []
    for fd in _open_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                raise OSError
            local, peer = _addr(s.getsockname()), _addr(s.getpeername())
        except OSError:
            s.close()
            continue
        if any(local[1] == p and _same_host(local[0], h) for h, p in mine):
            left.append(s)
        elif any(peer[1] == p and _same_host(peer[0], h) for h, p in right_addrs):
            right.append(s)
        else:
            s.close()
    if not left or not right:
        for s in left + right:
            s.close()
        return None
    return left, right


def _closed(s: socket.socket) -> bool:
    """Whether the peer closed the connection (never consumes data)."""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset
        return True


def wait_readable(socks: list[socket.socket], timeout: Optional[float], what: str, peer: int) -> None:
    """Block (no CPU) until one of `socks` has data. PeerLost when the connection closed, PeerTimeout
    after `timeout` seconds (None: wait for ever)."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if end is None else max(0.0, end - time.monotonic())
        try:
            ready, _, _ = select.select(socks, [], [], 1.0 if left is None else min(left, 1.0))
        except InterruptedError:
            continue
        for s in ready:
            if _closed(s):
                raise PeerLost(f"rank {peer} is gone (its connection closed while this rank waited for "
                               f"{what}); see its own output for why")
        if ready:
            return
        if end is not None and time.monotonic() >= end:
            raise PeerTimeout(f"rank {peer} sent nothing for {timeout:.0f} s while this rank waited for {what}; "
                              "giving up (is it still running? is the network up?)")


class Link:
    """This rank's place in the ring: who is left and right, and the ways to talk to them."""

    def __init__(self, group, timeout: float = DEFAULT_TIMEOUT):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.left, self.right = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        self.timeout = timeout
        found = find_ring_sockets(self.rank, self.size)
        self.left_socks, self.right_socks = found if found else (None, None)
        self.broken: Optional[str] = None  # why the ring can't be used any more
        self.closing = False
        self._in_send: Optional[tuple[str, float]] = None
        self._watchdog = threading.Thread(target=self._watch, name="kimi-mlx-pipeline-watchdog", daemon=True)
        self._watchdog.start()

    # -- failure ------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            busy = self._in_send
            if busy is None or self.closing:
                continue
            what, since = busy
            gone = self.right_socks is not None and any(_closed(s) for s in self.right_socks)
            late = time.monotonic() - since > self.timeout
            if (gone or late) and self._in_send is busy and not self.closing:
                why = (f"rank {self.right} is gone (its connection closed while this rank sent {what})" if gone
                       else f"sending {what} to rank {self.right} did not finish in {self.timeout:.0f} s")
                print(f"error: pipeline rank {self.rank}: {why}; stopping", file=sys.stderr, flush=True)
                os._exit(1)

    def _check(self) -> None:
        if self.broken:
            raise PipelineError(self.broken)

    def _fail(self, e: PipelineError) -> PipelineError:
        self.broken = str(e)
        return e

    # -- arrays ---------------------------------------------------------------
    def send(self, arrays: list[mx.array], what: str, extra: tuple = ()) -> None:
        """Send `arrays` to the right neighbour, in order, evaluating `extra` arrays in the same go
        (e.g. the cache the hidden state came with)."""
        self._check()
        ops = []
        for a in arrays:
            if ops:
                a = mx.depends(a, ops[-1])  # keep the order on the wire
            ops.append(mx.distributed.send(a, self.right, group=self.group))
        self._in_send = (what, time.monotonic())
        try:
            mx.eval(*ops, *extra)
        finally:
            self._in_send = None

    def wait(self, what: str, timeout: Optional[float] = -1.0) -> None:
        """Until data from the left neighbour is there (see wait_readable); timeout -1: the link's."""
        self._check()
        if self.left_socks is None:
            return
        try:
            wait_readable(self.left_socks, self.timeout if timeout == -1.0 else timeout, what, self.left)
        except PipelineError as e:
            raise self._fail(e) from None

    def linger(self, seconds: float) -> None:
        """Wait (at most `seconds`) for the left neighbour to hang up: a rank that stops for a reason
        rank 0 reports lets rank 0 say it first."""
        if self.left_socks is None:
            return
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select(self.left_socks, [], [], max(0.0, min(1.0, end - time.monotonic())))
            if any(_closed(s) for s in ready):
                return

    def recv(self, shape, dtype, what: str, timeout: Optional[float] = -1.0) -> mx.array:
        """An array from the left neighbour, received now."""
        self.wait(what, timeout)
        a = mx.distributed.recv(tuple(shape), dtype, self.left, group=self.group)
        mx.eval(a)
        return a

    def recv_lazy(self, shape, dtype, what: str) -> mx.array:
        """An array from the left neighbour, once it is arriving; received when evaluated. (A receive
        issued before its data is there spins a core in MLX's ring backend, which on a shared host
        slows the very rank it waits for.)"""
        self.wait(what)
        return mx.distributed.recv(tuple(shape), dtype, self.left, group=self.group)

    # -- blobs: JSON + arrays ------------------------------------------------
    def send_blobs(self, blobs: list[mx.array], what: str) -> None:
        arrays = []
        for b in blobs:
            arrays += [mx.array([b.size], dtype=mx.int64), b]
        if arrays:
            self.send(arrays, what)

    def recv_blob(self, what: str, timeout: Optional[float] = -1.0) -> mx.array:
        n = int(self.recv((1,), mx.int64, what, timeout).item())
        return self.recv((n,), mx.uint8, what, timeout)


def pack(meta, arrays: Optional[dict[str, mx.array]] = None) -> mx.array:
    """One uint8 array: 8-byte JSON length, the JSON (meta and the arrays' layout), the arrays' bytes."""
    arrays = arrays or {}
    layout = [[k, dtype_code(a.dtype), list(a.shape), a.nbytes] for k, a in arrays.items()]
    head = json.dumps({"meta": meta, "arrays": layout}).encode()
    parts = [mx.array(list(struct.pack("<Q", len(head)) + head), dtype=mx.uint8)]
    parts += [a.reshape(-1).view(mx.uint8) for a in arrays.values() if a.nbytes]
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def unpack(blob: mx.array):
    """(meta, {name: array}) of a `pack`ed blob."""
    (n,) = struct.unpack("<Q", np.array(blob[:8]).tobytes())
    head = json.loads(np.array(blob[8:8 + n]).tobytes())
    arrays, off = {}, 8 + n
    for name, code, shape, nbytes in head["arrays"]:
        dt = code_dtype(code)
        if nbytes:
            arrays[name] = blob[off:off + nbytes].view(dt).reshape(shape)
        else:
            arrays[name] = mx.zeros(shape, dtype=dt)
        off += nbytes
    return head["meta"], arrays


def ring_allgather(link: Link, meta) -> list:
    """Every rank's `meta` (JSON), in rank order, on every rank: passed around the ring N-1 times.
    Waits without a deadline (ranks may still be loading) but sees a dead peer."""
    got = {link.rank: meta}
    item = (link.rank, meta)
    for _ in range(link.size - 1):
        link.send_blobs([pack(list(item))], "a handshake")
        src, m = unpack(link.recv_blob("a handshake", timeout=None))[0]
        got[src] = m
        item = (src, m)
    return [got[r] for r in range(link.size)]
