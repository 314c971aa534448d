"""How the ingress treats a handle call whose replica went away (serve_app.backends.remote.send): once more, then a
503 with Retry-After, never a 500. No Ray is started: the calls raise Ray's own exception types."""
from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from contract.errors import InvalidRequest, Overloaded
from serve_app.backends.remote import send
from serve_app.http.errors import status_of


def calls(*outcomes):
    """A make_call for send: each call raises or returns the next outcome."""
    queue, made = list(outcomes), []

    async def make_call():
        made.append(1)
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return make_call, made


def test_a_call_on_a_lost_replica_is_sent_once_more():
    make_call, made = calls(ActorDiedError(), "vectors")
    assert asyncio.run(send(make_call)) == "vectors" and len(made) == 2


def test_a_second_loss_is_a_503_with_retry_after():
    make_call, made = calls(ActorDiedError(), ActorDiedError())
    with pytest.raises(Overloaded) as caught:
        asyncio.run(send(make_call))
    assert len(made) == 2 and status_of(caught.value).status == 503
    assert status_of(caught.value).headers["Retry-After"]


def test_work_not_safe_to_repeat_is_not_resent_and_request_errors_pass_through():
    make_call, made = calls(ActorDiedError())
    with pytest.raises(Overloaded):
        asyncio.run(send(make_call, retry=False))
    assert len(made) == 1
    make_call, made = calls(InvalidRequest("bad", "input"), "unused")
    with pytest.raises(InvalidRequest):
        asyncio.run(send(make_call))
    assert len(made) == 1
