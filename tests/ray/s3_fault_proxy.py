"""A TCP proxy on 127.0.0.1 in front of an S3-compatible server, for storage-fault tests.

Run as its own process (``python s3_fault_proxy.py LISTEN_PORT TARGET_PORT [SLOWDOWN_N]``):
killing it is the S3 endpoint going away (refused connections, uploads cut mid-body), and
starting it again on the same port is the endpoint coming back with its data intact (the data
lives in the server behind it). With ``SLOWDOWN_N`` the first N connections are answered
``503 SlowDown`` (S3's throttling reply) before any byte reaches the server; later ones are
forwarded. ``start_proxy`` / ``stop_proxy`` run it from a test; a test kills only the pid it
started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")


def start_proxy(port: int, target_port: int, slowdown: int = 0) -> subprocess.Popen:
    """Start the proxy process and wait until it accepts connections."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port),
                             str(target_port), str(slowdown)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the S3 fault proxy did not start on port {port}")


def stop_proxy(proc: subprocess.Popen) -> None:
    """SIGKILL the proxy this test started (the endpoint vanishes mid-request)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _slow_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        headers = head.decode("latin-1").lower()
        length = 0
        for line in headers.split("\r\n"):
            if line.startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        if length and "100-continue" not in headers:
            await asyncio.wait_for(reader.readexactly(length), 10)
        writer.write(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                     b"Content-Length: " + str(len(_SLOWDOWN_BODY)).encode() +
                     b"\r\nConnection: close\r\n\r\n" + _SLOWDOWN_BODY)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(port: int, target_port: int, slowdown: int) -> None:
    left = [slowdown]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if left[0] > 0:
            left[0] -= 1
            await _slow_down(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2]),
                       int(sys.argv[3]) if len(sys.argv) > 3 else 0))
