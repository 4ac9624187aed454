"""uvicorn's HTTP/1.1 protocol with the connection bounds it lacks: a cap on open connections, so slow clients cannot
use up the process's file descriptors and starve `accept`, and a deadline for each request's headers (uvicorn closes
idle kept-alive connections, but never one that trickles its headers).

At the cap a new connection takes the place of the one that has waited longest, over a second (or a quarter of the
header deadline, if less), for the client: for a request's headers, or for the rest of a request's body (a slow
client's: a prompt one sends them within milliseconds); when there is none, the new one is closed at once. A
connection whose request has arrived whole is never closed for a newcomer, so slow clients can delay new connections
by at most that second; only an upload slower than that second can be cut, and only at the cap."""

from __future__ import annotations

import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from saisa.serving.protocol import ServerLimits

logger = logging.getLogger(__name__)


class _Throttled:
    """A warning at most once per `every_s` seconds, counting what it did not print."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last, self.skipped = every_s, 0.0, 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.skipped += 1
            return
        suffix = f" ({self.skipped} more since the last report)" if self.skipped else ""
        logger.warning(message + suffix)
        self.last, self.skipped = now, 0


class GuardedH11Protocol(H11Protocol):
    max_connections = 256
    header_timeout_s = 10.0
    evict_after_s = 1.0  # at the cap, one this long without a request (at most a quarter of the deadline) makes room
    refusals = _Throttled()
    timeouts = _Throttled()

    def connection_made(self, transport) -> None:
        self._refused = False
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) >= self.max_connections:
            now = time.monotonic()
            waiting = {c: c._waiting_since() for c in live if isinstance(c, GuardedH11Protocol)}
            limit = min(self.evict_after_s, self.header_timeout_s / 4)
            stale = [c for c, since in waiting.items() if since is not None and now - since > limit]
            if stale:
                self.refusals.warn(f"closing the longest-waiting of {len(stale)} connections yet to send a request")
                min(stale, key=waiting.get)._close()
            else:
                self.refusals.warn(f"refusing a connection: {self.max_connections} are open (--max-connections)")
                self._refused = True
                transport.close()
                return
        super().connection_made(transport)
        self._opened, self._header_timer, self._request_at = time.monotonic(), None, None
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers have arrived
            self._request_at = time.monotonic()

    def _waiting_since(self) -> float | None:
        """Since when the client owes us a request's headers or the rest of its body; None once a request is whole."""
        if self.cycle is None:
            return self._opened
        if self.conn.their_state is h11.SEND_BODY:
            return self._request_at
        return None

    def connection_lost(self, exc) -> None:
        if self._refused:
            return
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this kept-alive connection gets its own header deadline

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late, self.cycle)

    def _headers_late(self, cycle_then) -> None:
        """No new request's headers since the timer was armed: close the connection."""
        self._header_timer = None
        if self.transport.is_closing() or self.cycle is not cycle_then:
            return
        if cycle_then is not None and not cycle_then.response_complete:
            return  # a request is being answered: its own deadline applies
        self.timeouts.warn(f"closing a connection whose request headers took over {self.header_timeout_s:g} s")
        self._close()

    def _close(self) -> None:
        # uncounted at once: uvicorn's concurrency limit counts a closed connection until `connection_lost`, a loop
        # iteration later, and would answer 503 to a request on the connection that took its place
        self.connections.discard(self)
        self.transport.close()


def uvicorn_config(app, *, host: str, port: int, limits: ServerLimits, log_level: str = "info"):
    """A `uvicorn.Config` for `app` with `limits`' connection bounds."""
    import uvicorn

    protocol = type(
        "SaisaH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": limits.max_connections, "header_timeout_s": limits.header_timeout_s},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections + 1,  # past the connection cap above: 503s, not closed sockets
        log_level=log_level,
    )


def run_server(app, *, host: str, port: int, limits: ServerLimits) -> None:
    """Serve `app` until interrupted, with file descriptors for every connection `limits` allows."""
    import uvicorn

    _enough_descriptors(limits.max_connections)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, limits=limits)).run()


def _enough_descriptors(connections: int) -> None:
    """Descriptors for every allowed connection and the model's files: a failed accept() floods asyncio's log."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"max_connections {connections} needs {needed} file descriptors; the limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
