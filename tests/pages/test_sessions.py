"""Browser sessions: signed cookies, expiry, revocation, CSRF tokens (kdlab.backend.services.sessions)."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from kdlab.backend.errors import Unauthorized
from kdlab.backend.services import sessions
from kdlab.backend.services.auth import create_token, hash_token
from kdlab.backend.settings import Settings


@pytest.fixture
def secure(settings: Settings) -> Settings:
    return settings.model_copy(update={"token": "s3cret"})


def test_a_signed_in_session_round_trips(db_session: Session, secure: Settings) -> None:
    cookie, made = sessions.sign_in(db_session, secure, "s3cret")
    found = sessions.decode(db_session, secure, cookie)
    assert found == made
    assert found.token_hash == hashlib.sha256(b"s3cret").hexdigest()
    assert found.expires == pytest.approx(time.time() + 7 * 24 * 3600, abs=5)


def test_the_csrf_token_is_an_hmac_of_the_session_id(db_session: Session, secure: Settings) -> None:
    _, browser = sessions.sign_in(db_session, secure, "s3cret")
    key = (Path(secure.data_path) / "session.key").read_bytes()
    digest = hmac.new(key, f"csrf|{browser.sid}".encode(), hashlib.sha256).digest()
    import base64

    assert browser.csrf == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert sessions.csrf_matches(browser, browser.csrf)
    assert not sessions.csrf_matches(browser, browser.csrf[:-1] + "x")
    assert not sessions.csrf_matches(browser, None)


def test_forged_expired_and_foreign_cookies_are_refused(
    db_session: Session, secure: Settings
) -> None:
    cookie, _ = sessions.sign_in(db_session, secure, "s3cret")
    body, signature = cookie.split(".")
    assert sessions.decode(db_session, secure, body + "." + signature[::-1]) is None
    assert sessions.decode(db_session, secure, "garbage") is None
    old, _ = sessions.encode(secure, hash_token("s3cret"), now=time.time() - 8 * 24 * 3600)
    assert sessions.decode(db_session, secure, old) is None  # expired
    other = secure.model_copy(update={"session_secret": "another-key"})
    assert sessions.decode(db_session, other, cookie) is None  # signed with another key


def test_changing_or_revoking_the_token_ends_its_sessions(
    db_session: Session, secure: Settings
) -> None:
    cookie, _ = sessions.sign_in(db_session, secure, "s3cret")
    rotated = secure.model_copy(update={"token": "new-secret"})
    assert sessions.decode(db_session, rotated, cookie) is None
    token = create_token(db_session, "laptop")
    db_session.commit()
    cookie, _ = sessions.sign_in(db_session, secure, token)
    assert sessions.decode(db_session, secure, cookie) is not None
    from sqlalchemy import update

    from kdlab.backend.db.models import ApiToken, utcnow

    db_session.execute(update(ApiToken).values(revoked_at=utcnow()))
    db_session.commit()
    assert sessions.decode(db_session, secure, cookie) is None


def test_wrong_and_run_scoped_tokens_do_not_sign_in(db_session: Session, secure: Settings) -> None:
    with pytest.raises(Unauthorized, match="not valid"):
        sessions.sign_in(db_session, secure, "guess")
    with pytest.raises(Unauthorized, match="Enter the server's token"):
        sessions.sign_in(db_session, secure, "  ")
    from tests.factories import create_run

    run = create_run(db_session)
    scoped = create_token(db_session, "worker", scope="run", run_id=run.id)
    db_session.commit()
    with pytest.raises(Unauthorized, match="scoped to one run"):
        sessions.sign_in(db_session, secure, scoped)


def test_an_open_session_is_valid_only_while_the_server_is_open(
    db_session: Session, settings: Settings, secure: Settings
) -> None:
    cookie, _ = sessions.encode(settings, sessions.OPEN)
    assert sessions.decode(db_session, settings, cookie) is not None
    assert sessions.decode(db_session, secure, cookie) is None  # a token was configured since
