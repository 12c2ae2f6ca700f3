"""Recovery time of a fault drill, from the answers callers saw."""

from __future__ import annotations

import pytest

from rtinfer.openload import Answer, recovered_at


def _answers(spec: str, start: float = 100.0, step: float = 0.1) -> list[Answer]:
    """One answer per character: g good, d degraded, x no answer, 5 a 503."""
    out = []
    for i, c in enumerate(spec):
        status = {"x": 0, "5": 503}.get(c, 200)
        out.append(Answer(start + i * step, start + i * step + 0.01, f"r{i}", status,
                          "deadline_exceeded:class_prior" if c == "d" else ""))  # fmt: skip
    return out


def test_recovery_starts_with_the_first_good_window() -> None:
    answers = _answers("gggg" + "dddddddddd" + "gggggggggggggggggggg")
    fault = 100.35
    assert recovered_at(answers, fault, quiet_s=1.0, good_share=0.95) == pytest.approx(101.4)


def test_a_stray_degraded_answer_after_recovery_is_noise_but_errors_are_not() -> None:
    noisy = _answers("ddddd" + "ggggggggggggdggggggggggg")
    assert recovered_at(noisy, 100.0, quiet_s=1.0, good_share=0.9) == pytest.approx(100.5)
    failing = _answers("ddddd" + "gggggg5ggg" + "ggggggggggggggg")
    # the window may not hold the 503: it starts after it
    assert recovered_at(failing, 100.0, quiet_s=1.0, good_share=0.9) == pytest.approx(101.2)
    unanswered = _answers("gggggxgggg")  # the window never completes without later answers
    assert recovered_at(unanswered, 100.0, quiet_s=1.0, good_share=0.9) is None
