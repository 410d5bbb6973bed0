"""The one error type of the deploy library: what failed, why, and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeployError(Exception):
    """A deployment step that cannot go on.

    `cause` says what is wrong in the user's terms, `fix` what to change; `left_behind` lists the
    resources a rollback could not remove (empty when nothing was left half-created).
    """

    cause: str
    fix: str
    param: str | None = None
    left_behind: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.cause} Fix: {self.fix}"
        if self.left_behind:
            text += " Left behind (remove by hand or run `whisper-deploy cleanup`): " + ", ".join(self.left_behind)
        return text


def aws_error_text(exc: BaseException) -> str:
    """`Code: message` of a botocore ClientError, else the exception's own text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = error.get("Code") or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = (error.get("Message") or "").strip()
        if len(message) > 300 or message.startswith("<"):
            message = message[:300].split("\n", 1)[0]
        return f"{code}: {message}" if message else code
    return f"{type(exc).__name__}: {exc}"


def aws_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""
