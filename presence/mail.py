"""How a one-time sign-in link reaches a person: by mail through the operator's SMTP server, or,
on a single machine without one, in the node's log (the operator passes it on)."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol
from urllib.parse import urlsplit

from twisted.logger import Logger

log = Logger()

MAIL, LOG = "mail", "log"


class Mailer(Protocol):
    async def send_login_link(self, email: str, link: str) -> str:
        """Deliver the link; returns how (MAIL or LOG). Raises if it could not be sent."""


class LogMailer:
    """No mail server: the link goes to the node's log, the one place it may appear in a log."""

    async def send_login_link(self, email: str, link: str) -> str:
        log.info("one-time sign-in link for {email} (no --smtp-host, so it is given here): {link}",
                 email=email, link=link, event="login.link")
        return LOG


class SMTPMailer:
    """Sends the link through ``host:port`` (STARTTLS when the server offers it)."""

    def __init__(self, reactor: Any, host: str, port: int, sender: str, site: str):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.sender = sender
        self.site = site

    def message(self, email: str, link: str) -> bytes:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = email
        msg["Subject"] = f"Sign in to Presence at {self.site}"
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=self.sender.rpartition("@")[2] or None)
        msg.set_content(
            f"Someone (hopefully you) asked to sign in to Presence at {self.site} as {email}.\n\n"
            f"Open this link in the browser you want to sign in with; it works once:\n\n{link}\n\n"
            "If you did not ask for it, ignore this mail: nothing happens without the link.\n")
        return msg.as_bytes()

    async def send_login_link(self, email: str, link: str) -> str:
        from twisted.mail.smtp import sendmail

        try:
            await sendmail(self.host, self.sender, [email], self.message(email, link), port=self.port,
                           reactor=self.reactor)
        except Exception as e:
            # The link is in the message, never in this line.
            log.error("could not mail a sign-in link to {email} through {host}:{port}: {why}", email=email,
                      host=self.host, port=self.port, why=e, event="login.mail_failed")
            raise
        log.info("mailed a sign-in link to {email}", email=email, event="login.mailed")
        return MAIL


def mailer_from_config(config: Any, reactor: Any) -> Mailer:
    if not config.smtp_host:
        return LogMailer()
    host = urlsplit(config.public_url).hostname or "localhost"
    sender = config.smtp_from or f"presence@{host}"
    return SMTPMailer(reactor, config.smtp_host, config.smtp_port, sender, config.public_url)
