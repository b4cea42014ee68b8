"""tests/requires.py: a missing requirement is a skip outside CI and a failure in CI."""

from __future__ import annotations

import pytest

import requires


def _unmet(monkeypatch: pytest.MonkeyPatch, in_ci: bool):
    monkeypatch.setattr(requires, "IN_CI", in_ci)

    def test_needing_a_tool(tmp_path) -> None:
        raise AssertionError("must not run when its requirement is unmet")
    return requires.requires(False, "no frobnicator: pip install frob"), test_needing_a_tool


def test_outside_ci_an_unmet_requirement_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    decorator, test = _unmet(monkeypatch, in_ci=False)
    marked = decorator(test)
    (mark,) = marked.pytestmark
    assert mark.name == "skip" and mark.kwargs["reason"] == "no frobnicator: pip install frob"
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        requires.need(False, "no frobnicator: pip install frob")


def test_in_ci_an_unmet_requirement_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    decorator, test = _unmet(monkeypatch, in_ci=True)
    failing = decorator(test)
    assert failing.__name__ == "test_needing_a_tool" and not hasattr(failing, "pytestmark")
    with pytest.raises(pytest.fail.Exception, match="no frobnicator.*a CI checkout"):
        failing(tmp_path=None)
    with pytest.raises(pytest.fail.Exception, match="no frobnicator"):
        requires.need(False, "no frobnicator: pip install frob")


def test_a_met_requirement_leaves_the_test_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for in_ci in (False, True):
        monkeypatch.setattr(requires, "IN_CI", in_ci)
        assert requires.requires(True, "unused")(len) is len
        requires.need(True, "unused")

