"""A slow link between the router and a destination: a TCP proxy that carries at most `mbps`
toward the destination over all its connections together, and records when each byte came
from the router and when it went on.

Its pacing is its own (a wire that takes n / rate seconds per chunk), not the router's token
bucket, so that it can measure the router's `max_mbps` rather than share its mistakes.
"""

from __future__ import annotations

import socket
import threading
import time

READ = 16 * 1024


class SlowLink:
    def __init__(self, target_port: int, mbps: float = 0.0, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.rate = mbps * 1_000_000 / 8  # bytes per second toward the target; 0: as fast as it goes
        self._wire_free = 0.0  # monotonic time the wire is free again
        self._lock = threading.Lock()
        self.arrived: list[tuple[float, int]] = []  # (monotonic time, bytes) read from the router
        self.carried: list[tuple[float, int]] = []  # (monotonic time, bytes) written to the target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closing = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="slow-link", daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # small buffers: the router's pace is seen here, not absorbed by the kernel
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, toward_target: bool) -> None:
        try:
            while True:
                chunk = source.recv(READ)
                if not chunk:
                    break
                if toward_target:
                    now = time.monotonic()
                    with self._lock:
                        self.arrived.append((now, len(chunk)))
                        if self.rate:
                            start = max(now, self._wire_free)
                            self._wire_free = start + len(chunk) / self.rate
                            done = self._wire_free
                    if self.rate:
                        time.sleep(max(0.0, done - time.monotonic()))
                sink.sendall(chunk)
                if toward_target:
                    with self._lock:
                        self.carried.append((time.monotonic(), len(chunk)))
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def peak_mbps(self, window_s: float = 1.0, carried: bool = False) -> float:
        """The most megabits any `window_s` of arrivals from the router (or carried) held."""
        with self._lock:
            events = list(self.carried if carried else self.arrived)
        most, total, start = 0, 0, 0
        for end in range(len(events)):
            total += events[end][1]
            while events[end][0] - events[start][0] > window_s:
                total -= events[start][1]
                start += 1
            most = max(most, total)
        return most * 8 / 1_000_000 / window_s

    def busy_seconds(self) -> float:
        """From the first byte carried to the last."""
        with self._lock:
            return self.carried[-1][0] - self.arrived[0][0] if self.carried else 0.0

    def bytes_carried(self) -> int:
        with self._lock:
            return sum(n for _, n in self.carried)

    def close(self) -> None:
        self._closing = True
        self._server.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
