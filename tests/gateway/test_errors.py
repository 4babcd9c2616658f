"""How a request the scheduler ended with an error is answered: by its ErrorCode alone."""

from __future__ import annotations

import pytest

from services.gateway.errors import scheduler_error
from shared.messages import ErrorCode


@pytest.mark.parametrize(
    "code, status, retry_after",
    [
        (ErrorCode.TOO_LONG, 400, None),
        (ErrorCode.INVALID_REQUEST, 400, None),
        (ErrorCode.QUEUE_TIMEOUT, 503, "5"),
        (ErrorCode.GATEWAY_GONE, 503, "1"),
        (ErrorCode.REQUEST_TIMEOUT, 504, None),
        (ErrorCode.WORKER_FAILED, 500, None),
        (ErrorCode.INTERNAL, 500, None),
    ],
)
def test_every_error_code_has_its_status(code, status, retry_after):
    err = scheduler_error(code, "whatever the text says: max_model_len, queue timeout")
    assert (err.status, err.code, err.headers.get("Retry-After")) == (status, code.value, retry_after)
    assert "whatever the text says" in err.message


def test_the_table_covers_every_code():
    assert {scheduler_error(code, None).code for code in ErrorCode} == {code.value for code in ErrorCode}


def test_an_output_without_a_code_is_an_internal_error():
    err = scheduler_error(None, "queue timeout: the text is not read")
    assert (err.status, err.code) == (500, "internal")
