"""One long-lived thread that runs every MLX call of an app (the chat app's engine, the server).

MLX (>= 0.31.2) streams are thread-local: a stream made on one thread can't be used from another.
Apps whose frameworks start threads of their own (Textual's workers, an HTTP server's event loop)
funnel all model work through this one thread and its single stream. Jobs run one at a time in
the order they were handed in, which also serialises prefill and generation (memory).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable


class MLXThreadClosed(RuntimeError):
    """The thread is closing: the job was not waited for."""


class MLXThread:
    """The thread, its stream and its FIFO queue of jobs (see the module docstring)."""

    def __init__(self):
        self.closing = threading.Event()  # the app is quitting: stop waiting
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kimi-mlx", daemon=True)
        self._thread.start()

    def _run(self):
        import mlx.core as mx

        stream = mx.new_thread_local_stream(mx.default_device())
        with mx.stream(stream):
            while True:
                job = self._jobs.get()
                if job is None:  # close(): end the thread (and its stream) cleanly
                    return
                fn, box, done = job
                try:
                    box["result"] = fn()
                except BaseException as e:  # handed back to the caller's thread
                    box["error"] = e
                done.set()

    def should_stop(self, cancel: threading.Event) -> Callable[[], bool]:
        """For kimi_mlx's should_stop: the caller's cancel, or the app quitting."""
        return lambda: cancel.is_set() or self.closing.is_set()

    def close(self) -> None:
        """Stop the running job at its next step and join the thread.

        MLX's threads must have ended before the interpreter shuts down, or the
        process aborts ("terminate called without an active exception").
        A model load can't be interrupted: this waits for it.
        """
        self.closing.set()
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def closed_error(self) -> BaseException:
        """What `call` raises when the thread closes while it waits (apps override it)."""
        return MLXThreadClosed("the MLX thread is closing")

    def submit(self, fn) -> None:
        """Run ``fn`` on the MLX thread after what is queued, without waiting for it."""
        self._jobs.put((fn, {}, threading.Event()))

    def call(self, fn):
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        # Poll so quitting never waits for a long load or prefill to finish:
        # the app's worker threads must end for the process to exit.
        while not done.wait(0.1):
            if self.closing.is_set():
                raise self.closed_error()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def iterate(self, make_iter, cancel: threading.Event):
        """Run ``make_iter()`` on the MLX thread, yielding its items here."""
        out: "queue.Queue" = queue.Queue()  # unbounded: deltas are tiny, never block MLX
        stop = threading.Event()  # consumer went away (closed generator, error)
        end = object()

        def produce():
            try:
                for item in make_iter():
                    out.put(item)
                    if cancel.is_set() or stop.is_set() or self.closing.is_set():
                        break
            except BaseException as e:
                out.put(_Failure(e))
                return
            out.put(end)

        self._jobs.put((produce, {}, threading.Event()))
        try:
            while True:
                try:
                    item = out.get(timeout=0.1)
                except queue.Empty:
                    if self.closing.is_set():
                        return
                    continue
                if item is end:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()


@dataclass
class _Failure:
    error: BaseException
