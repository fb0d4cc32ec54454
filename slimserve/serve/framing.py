"""Length-prefixed frames over a stream socket. Neither end ever blocks on the other: the engine process
buffers what the socket cannot take yet, the front end uses asyncio streams."""

from __future__ import annotations

import asyncio
import selectors
import socket
import struct

HEADER = struct.Struct("!Q")


class FrameSocket:
    """The engine process's end, non-blocking both ways and used from one thread: frames the front end is
    slow to read wait in a buffer instead of stopping the step loop (a sending thread would contend for
    the interpreter lock between steps)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._out = bytearray()
        self._in = bytearray()
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)

    def send(self, payload: bytes) -> None:
        self._out += HEADER.pack(len(payload))
        self._out += payload
        self.flush()

    def flush(self) -> None:
        """Write what the socket takes now."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                return
            del self._out[:sent]

    def receive(self, block: bool) -> list[bytes]:
        """The frames that have arrived; with block, waits for at least one (still sending meanwhile).
        Raises EOFError once the front end has closed its end."""
        while True:
            self.flush()
            self._read_available()
            frames = self._complete_frames()
            if frames or not block:
                return frames
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
            self._selector.modify(self.sock, events)
            self._selector.select()

    def close(self) -> None:
        """Send what is buffered, waiting as long as it takes, then close."""
        self.sock.setblocking(True)
        self.sock.sendall(self._out)
        self._selector.close()
        self.sock.close()

    def _read_available(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                raise EOFError("the front end closed the connection")
            self._in += chunk

    def _complete_frames(self) -> list[bytes]:
        frames = []
        while len(self._in) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._in)
            end = HEADER.size + size
            if len(self._in) < end:
                break
            frames.append(bytes(self._in[HEADER.size : end]))
            del self._in[:end]
        return frames


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return await reader.readexactly(size)


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.writelines([HEADER.pack(len(payload)), payload])
