"""``bench caption``'s score: the share of each reference's digit and direction words the caption contains."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from imp_platform.bench.caption import word_accuracy


def test_word_accuracy_scores_digits_and_directions_separately():
    rows = [SimpleNamespace(reference="the digit three moves left", generated="the number three slides up"),
            SimpleNamespace(reference="a handwritten eight moving up", generated="the digit eight moves up")]
    scores = word_accuracy(rows)
    assert scores["caption_digit_word_accuracy"] == 1.0
    assert scores["caption_direction_word_accuracy"] == pytest.approx(0.5)
    assert scores["caption_word_accuracy"] == pytest.approx(0.75)
