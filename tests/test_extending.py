"""Runs docs/extending.md: every ```python block, in order, in one namespace, then every ``test_*`` function the
blocks define. The printed report in the doc is compared with the real one (modulo the error digits)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import fxfuse

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
RULE = "linear_chain"


def _blocks(kind: str) -> List[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def doc() -> Iterator[Dict[str, object]]:
    """The namespace after executing the doc's python blocks; the rule it registers is removed afterwards."""
    assert all(r.name != RULE for r in fxfuse.registered_rules()), "linear_chain must not be built in"
    namespace: Dict[str, object] = {"__name__": "docs_extending"}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for i, code in enumerate(_blocks("python")):
                exec(compile(code, f"{DOC}:python-block-{i}", "exec"), namespace)
        namespace["__stdout__"] = out.getvalue()
        yield namespace
    finally:
        if any(r.name == RULE for r in fxfuse.registered_rules()):
            fxfuse.unregister_rule(RULE)


def test_doc_has_the_pieces() -> None:
    text = DOC.read_text()
    assert len(_blocks("python")) >= 4
    for needle in ("register_rule", "enable=[", "rules=[", "assert_reparametrizes", "@given"):
        assert needle in text, needle


def test_rule_is_registered_disabled(doc: Dict[str, object]) -> None:
    rule = next(r for r in fxfuse.registered_rules() if r.name == RULE)
    assert rule.enabled is False and rule.fn is doc["linear_chain"]


def test_printed_report_matches_doc(doc: Dict[str, object]) -> None:
    printed = str(doc["__stdout__"]).strip().splitlines()
    documented = _blocks("text")[0].strip().splitlines()
    number = re.compile(r"[0-9.]+e-[0-9]+")
    assert len(printed) == len(documented)
    for got, want in zip(printed, documented):
        assert number.sub("#", got) == number.sub("#", want)


def test_doc_property_tests(doc: Dict[str, object]) -> None:
    tests = [v for k, v in doc.items() if k.startswith("test_") and callable(v)]
    assert len(tests) == 2
    for t in tests:
        t()
