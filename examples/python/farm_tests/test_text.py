import textwrap

import pytest


@pytest.mark.parametrize("word", ["level", "rotor", "stats"])
def test_palindromes_read_the_same_backwards(word):
    assert word == word[::-1]


def test_wrapping_keeps_every_word():
    text = "forked sandboxes start where their parent left off " * 4
    assert textwrap.wrap(text, 20) and " ".join(textwrap.wrap(text, 20)) == text.strip()


def test_title_case():
    assert "fork many children".title() == "Fork Many Children"
