"""Every rule test runs twice: with ``capture="auto"`` (symbolic tracing first) and with ``capture="export"``
(``torch.export`` → the functional ATen graph), so each rule is shown to read both graph spellings.

The autouse ``capture`` fixture is parametrized over :data:`CAPTURES` (test ids ``[auto]`` / ``[export]``) and sets
the default that :func:`_helpers.fuse_and_check` and :func:`_helpers.assert_wrong_rewrite_caught` pass as
``reparametrize(capture=…)``; a test that needs to know which capture it runs under asks for the fixture by name.
A test that chooses its captures itself is marked ``@pytest.mark.fixed_capture("why")`` and runs once (the
fixture is then ``None`` and the default stays ``"auto"``)."""

from __future__ import annotations

from typing import Iterator, Optional

import pytest

from _helpers import default_capture

CAPTURES = ("auto", "export")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fixed_capture(why): the test picks its capture(s) itself and runs once")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "capture" in metafunc.fixturenames and metafunc.definition.get_closest_marker("fixed_capture") is None:
        metafunc.parametrize("capture", CAPTURES, indirect=True, ids=list(CAPTURES))


@pytest.fixture(autouse=True)
def capture(request: pytest.FixtureRequest) -> Iterator[Optional[str]]:
    """The capture this run of the test uses by default (``None`` for a ``fixed_capture`` test)."""
    value: Optional[str] = getattr(request, "param", None)
    if value is None:
        yield None
        return
    with default_capture(value):
        yield value
