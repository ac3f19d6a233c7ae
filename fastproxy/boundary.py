"""Where Python work leaves the engine's loop thread.

The loop calls Python at two points per connection, and at both it only queues:
  - a CONNECT for the policy gate goes to `PolicyDispatcher.submit`: plain hooks run on a
    small pool of threads, `async def` hooks on an asyncio loop (fastproxy's own, or the
    embedding application's); the answer goes back with `Engine.policy_answer`, and a hook
    that does not answer within `policy_timeout` costs its own client a CONNACK 0x88;
  - a finished connection's record goes to `RecordSink.put`: one thread formats the access
    log, logs failures and calls `on_record`; a full queue drops records and counts them.
An exception in user code is logged with its traceback and counted; it never reaches the
loop. Threads start in `start()` (after any fork: workers build their own).
"""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .log import policy_log, server_log

if TYPE_CHECKING:  # asyncio is imported only where an async hook needs it (it costs MiBs per worker)
    import asyncio

# The answer a gate gives for one CONNECT: (action, reason_code_v5, upstream | None, new_client_id | None).
Answer = "tuple[int, int, int | None, bytes | None]"
_REFUSE = (1, 0x88, None, None)     # Server unavailable (3.x: 0x03)


class PolicyDispatcher:
    """Runs each listener's gate off the loop thread and hands the answers back."""

    def __init__(self, gates: Sequence[Any], answer: Callable[[int, tuple], None], *, threads: int,
                 loop: "asyncio.AbstractEventLoop | None" = None) -> None:
        self._gates = list(gates)
        self._answer = answer
        self._n_threads = max(1, threads)
        self._queue: queue.SimpleQueue[tuple[int, Any, tuple] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop = loop
        self._own_loop: "asyncio.AbstractEventLoop | None" = None
        self._loop_thread: threading.Thread | None = None
        self.errors = 0
        self.needed = any(g is not None for g in self._gates)

    def start(self) -> None:
        if not self.needed or self._threads:
            return
        if any(g is not None and g.is_async for g in self._gates) and self._loop is None:
            import asyncio

            self._own_loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._own_loop.run_forever, name="fastproxy-asyncio",
                                                 daemon=True)
            self._loop_thread.start()
        for i in range(self._n_threads):
            t = threading.Thread(target=self._work, name=f"fastproxy-policy-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, token: int, request: tuple) -> None:
        """On the loop thread: queue one CONNECT; never blocks, never runs user code."""
        gate = self._gates[request[0]]
        if gate.is_async:
            import asyncio

            loop = self._loop or self._own_loop
            assert loop is not None
            fut = asyncio.run_coroutine_threadsafe(gate.decide_async(request), loop)
            fut.add_done_callback(lambda f: self._async_done(token, f))
        else:
            self._queue.put((token, gate, request))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            token, gate, request = item
            try:
                ans = gate(request)
            except BaseException:  # the gate catches the hook's errors; this is a bug in it
                self.errors += 1
                policy_log.exception("policy gate failed; refusing the client")
                ans = _REFUSE
            self._answer(token, ans)

    def _async_done(self, token: int, fut: Any) -> None:
        try:
            ans = fut.result()
        except BaseException:
            self.errors += 1
            policy_log.exception("async policy gate failed; refusing the client")
            ans = _REFUSE
        self._answer(token, ans)

    def stop(self) -> None:
        """Let the threads go once their current hook returns (a stuck hook keeps its daemon
        thread, which does not hold up the process's exit)."""
        for _ in self._threads:
            self._queue.put(None)
        self._threads = []
        if self._own_loop is not None:
            self._own_loop.call_soon_threadsafe(self._own_loop.stop)
            self._own_loop = None


class RecordSink:
    """A bounded queue of connection records and the one thread that consumes them."""

    def __init__(self, handler: Callable[[tuple], None], *, maxsize: int) -> None:
        self._handler = handler
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.errors = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fastproxy-records", daemon=True)
            self._thread.start()

    def put(self, rec: tuple) -> None:
        """On the loop thread: queue a record, or drop and count it when the queue is full."""
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            rec = self._queue.get()
            if rec is None:
                return
            try:
                self._handler(rec)
            except Exception:
                server_log.exception("connection record handler (access log / on_record) failed")
                self.errors += 1    # after the log line: whoever sees the count finds the line

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (at most `timeout` seconds), then end the thread."""
        t, self._thread = self._thread, None
        if t is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            server_log.warning("record queue still full at stop: %d records not written", self._queue.qsize())
            return
        t.join(timeout)
