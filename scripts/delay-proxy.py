#!/usr/bin/env python3
"""A TCP proxy that adds a fixed one-way delay to everything it forwards, in both directions,
keeping the order of the bytes (a stand-in for netem, which these kernels lack).

Usage: delay-proxy.py DELAY_MS LISTEN_HOST:PORT TARGET_HOST:PORT [LISTEN TARGET ...]
Prints "ready" on stdout once every pair listens; runs until killed."""
import asyncio
import sys
import time


async def pump(reader, writer, delay):
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        # Half-close: the other direction may still carry data (a data-plane receiver never
        # writes, and its sender never reads).
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            queue.put_nowait((time.monotonic() + delay, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def serve(listen, target, delay):
    host, port = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)

    async def handle(reader, writer):
        try:
            treader, twriter = await asyncio.open_connection(thost, int(tport))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, twriter, delay), pump(treader, writer, delay))
        writer.close()
        twriter.close()

    return await asyncio.start_server(handle, host, int(port))


async def main():
    delay = float(sys.argv[1]) / 1e3
    pairs = sys.argv[2:]
    servers = [await serve(pairs[i], pairs[i + 1], delay) for i in range(0, len(pairs), 2)]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
