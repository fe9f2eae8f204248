"""SMTP sink for watchpost's tests: a real aiosmtpd server on 127.0.0.1 that stores each
accepted message as <outdir>/<n>.eml (written atomically) and, with --auth USER:PASS,
requires AUTH PLAIN/LOGIN over the plain connection. With --reject it answers every DATA
with 550 (a permanent failure). With --tls implicit (SMTPS) or --tls starttls (STARTTLS
required before MAIL and AUTH) it serves the PEM --cert/--key pair. Prints "ready" once
listening; stops on SIGTERM or when stdin closes.

usage: smtp_sink.py --port PORT --outdir DIR [--auth USER:PASS] [--reject]
                    [--tls implicit|starttls --cert PEM --key PEM]
"""
import argparse
import logging
import os
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Sink:
    def __init__(self, outdir, reject):
        self.outdir = outdir
        self.reject = reject
        self.lock = threading.Lock()
        self.n = 0

    async def handle_DATA(self, server, session, envelope):
        if self.reject:
            return "550 5.7.1 rejected by the test sink"
        with self.lock:
            self.n += 1
            n = self.n
        rcpt = ",".join(envelope.rcpt_tos)
        # session.ssl is only set by STARTTLS; implicit TLS shows on the transport.
        implicit = server.transport.get_extra_info("ssl_object") is not None
        tls = "yes" if session.ssl or implicit else "no"
        auth = "yes" if session.authenticated else "no"
        head = (
            f"X-Sink-Mail-From: {envelope.mail_from}\r\nX-Sink-Rcpt-To: {rcpt}\r\n"
            f"X-Sink-TLS: {tls}\r\nX-Sink-Auth: {auth}\r\n"
        ).encode()
        tmp = os.path.join(self.outdir, f".{n}.tmp")
        with open(tmp, "wb") as f:
            f.write(head + envelope.original_content)
        os.replace(tmp, os.path.join(self.outdir, f"{n:04}.eml"))
        return "250 OK stored"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--auth")
    ap.add_argument("--reject", action="store_true")
    ap.add_argument("--tls", choices=["implicit", "starttls"])
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    # aiosmtpd logs AUTH-without-TLS warnings on every session; a local test sink wants that.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    kwargs = {}
    if a.auth:
        user, pw = a.auth.split(":", 1)

        def check(server, session, envelope, mechanism, data):
            ok = isinstance(data, LoginPassword) and data.login == user.encode() and data.password == pw.encode()
            return AuthResult(success=ok, handled=False)

        kwargs = dict(authenticator=check, auth_required=True, auth_require_tls=a.tls == "starttls")
    if a.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.cert, a.key)
        if a.tls == "implicit":
            kwargs["ssl_context"] = ctx
        else:
            kwargs.update(tls_context=ctx, require_starttls=True)
    c = Controller(Sink(a.outdir, a.reject), hostname="127.0.0.1", port=a.port, **kwargs)
    c.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        c.stop()


if __name__ == "__main__":
    main()
