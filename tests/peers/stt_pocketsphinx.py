#!/usr/bin/env python3
"""Deepgram-live-style speech-to-text test peer backed by a real recognizer.

A small stand-in for `wss://api.deepgram.com/v1/listen` used by watchpost's
tests: it speaks the Deepgram live wire protocol (see /work/shared/PROTOCOLS.md)
but transcribes with PocketSphinx (PyPI `pocketsphinx`, bundled en-us model), so
tests exercise genuine recognition of probes/audio/*.wav rather than canned text.

    python3 tests/peers/stt_pocketsphinx.py --port 0
    -> prints "LISTENING <port>" on stdout once bound to 127.0.0.1, serves until killed.

Per connection: requires `Authorization: Token <key>` (else HTTP 401 with a
Deepgram-shaped JSON error), answers the upgrade with a `dg-request-id` header,
takes binary linear16 / 16 kHz / mono audio, sends an interim Results about every
second of audio, and on Finalize / CloseStream sends the final Results (CloseStream
then sends Metadata and closes 1000). KeepAlive is accepted and ignored. Query
parameters (encoding, sample_rate, ...) are accepted but not checked.
"""

import argparse
import asyncio
import json
import time
import uuid

from pocketsphinx import Decoder
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

RATE = 16000
BYTES_PER_SEC = RATE * 2  # 16-bit mono
INTERIM_EVERY = 1.0  # seconds of audio between interim results


def check_auth(connection, request):
    connection.request_id = str(uuid.uuid4())
    scheme, _, key = (request.headers.get("Authorization") or "").partition(" ")
    if scheme == "Token" and key.strip():
        return None
    body = json.dumps({"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.",
                       "request_id": connection.request_id})
    response = connection.respond(401, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def add_request_id(connection, request, response):
    response.headers["dg-request-id"] = connection.request_id


class Session:
    def __init__(self, ws, decoder):
        self.ws, self.decoder = ws, decoder
        self.request_id = ws.request_id
        self.received = 0  # bytes of audio in total
        self.utt_start = 0  # byte offset where the current utterance began
        self.next_interim = INTERIM_EVERY
        self.in_utt = False
        self.carry = b""  # odd trailing byte of a frame split mid-sample

    def seconds(self, nbytes):
        return nbytes / BYTES_PER_SEC

    def hyp(self):
        h = self.decoder.hyp()
        return (h.hypstr if h is not None else "").strip().lower()

    async def results(self, transcript, final):
        start = self.seconds(self.utt_start)
        msg = {"type": "Results", "channel_index": [0, 1],
               "duration": round(self.seconds(self.received) - start, 3),
               "start": round(start, 3), "is_final": final, "speech_final": final,
               "channel": {"alternatives": [{"transcript": transcript, "confidence": 0.9}]},
               "metadata": {"request_id": self.request_id}}
        if final:
            msg["from_finalize"] = True
        await self.ws.send(json.dumps(msg))

    async def audio(self, frame):
        data = self.carry + frame
        whole = len(data) & ~1
        data, self.carry = data[:whole], data[whole:]
        if not self.in_utt:
            self.decoder.start_utt()
            self.in_utt, self.utt_start = True, self.received
        self.received += len(frame)
        if data:
            self.decoder.process_raw(data, False, False)
        if self.seconds(self.received) >= self.next_interim:
            while self.next_interim <= self.seconds(self.received):
                self.next_interim += INTERIM_EVERY
            partial = self.hyp()
            if partial:
                await self.results(partial, final=False)

    async def finalize(self):
        transcript = ""
        if self.in_utt:
            self.decoder.end_utt()
            self.in_utt, transcript = False, self.hyp()
        await self.results(transcript, final=True)
        self.utt_start = self.received

    async def close_stream(self):
        await self.finalize()
        await self.ws.send(json.dumps({
            "type": "Metadata", "transaction_key": "deprecated",
            "request_id": self.request_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration": round(self.seconds(self.received), 3), "channels": 1}))
        await self.ws.close(1000)


async def handler(ws):
    decoder = await asyncio.to_thread(Decoder, samprate=RATE, loglevel="FATAL")
    session = Session(ws, decoder)
    try:
        async for message in ws:
            if isinstance(message, bytes):
                if not message:  # Deepgram treats an empty binary frame as end of stream
                    await session.close_stream()
                    return
                await session.audio(message)
                continue
            try:
                kind = json.loads(message).get("type")
            except (ValueError, AttributeError):
                continue
            if kind == "Finalize":
                await session.finalize()
            elif kind == "CloseStream":
                await session.close_stream()
                return
            # KeepAlive and anything else: nothing to do.
    except ConnectionClosed:
        pass  # client went away mid-stream


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = ephemeral)")
    args = parser.parse_args()
    async with serve(handler, "127.0.0.1", args.port, process_request=check_auth,
                     process_response=add_request_id, max_size=2**22) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"LISTENING {port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
