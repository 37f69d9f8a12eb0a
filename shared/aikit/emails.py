"""Outgoing email behind a small interface: the log (default, local runs) or Amazon SES."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from aikit.errors import MailerError
from aikit.observability import logger
from aikit.settings import Settings


@dataclass(frozen=True, slots=True)
class Email:
    to: str
    subject: str
    body: str  # plain text


class Mailer(ABC):
    @abstractmethod
    def send(self, email: Email) -> None:
        """Hand one message over for delivery; raises MailerError on failure."""


class LogMailer(Mailer):
    """Writes the message to the log instead of sending it (local runs, tests)."""

    def send(self, email: Email) -> None:
        logger.info("email", extra={"to": email.to, "subject": email.subject, "body": email.body})


class SesMailer(Mailer):
    """Amazon SES `send_email`. The client is created on first use, so moto (or a Lambda's
    environment) is in place before boto3 reads its configuration."""

    def __init__(self, source: str, *, region_name: str | None = None, client: Any = None) -> None:
        self._source = source
        self._region_name = region_name
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client("ses", region_name=self._region_name)
        return self._client

    def send(self, email: Email) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.send_email(
                Source=self._source,
                Destination={"ToAddresses": [email.to]},
                Message={
                    "Subject": {"Data": email.subject, "Charset": "UTF-8"},
                    "Body": {"Text": {"Data": email.body, "Charset": "UTF-8"}},
                },
            )
        except (BotoCoreError, ClientError) as exc:
            raise MailerError(f"SES send_email failed: {exc}") from exc


def mailer_from_settings(settings: Settings) -> Mailer:
    if settings.email_backend == "ses":
        return SesMailer(settings.email_from)
    return LogMailer()
