"""Golden tests of the answer parsers: what a reader of the answer would say it chose."""

from __future__ import annotations

import pytest

from medgemma_train.evals.parse import parse_choice, parse_labels, parse_short, strip_thinking

OPTIONS = {"A": "Pneumonia", "B": "Tuberculosis", "C": "Asthma", "D": "Lung cancer",
           "E": "Sarcoidosis"}

GOLDEN = [
    # bare letters and their decorations
    ("B", "B"),
    ("(B)", "B"),
    ("[C]", "C"),
    ("B.", "B"),
    ("B)", "B"),
    ("b)", "B"),
    ("(d)", "D"),
    ("e", "E"),
    ("  D  ", "D"),
    ("**C**", "C"),
    ("`A`", "A"),
    ("B: Tuberculosis", "B"),
    ("B. Tuberculosis", "B"),
    ("B - Tuberculosis", "B"),
    ("D\n\nLung cancer is the most likely diagnosis.", "D"),
    ("A Pneumonia", "A"),
    # explicit statements
    ("Answer: B", "B"),
    ("answer: c", "C"),
    ("The answer is D.", "D"),
    ("The correct answer is (C) Asthma.", "C"),
    ("Final answer: E", "E"),
    ("**Answer:** B. Tuberculosis", "B"),
    ("The correct option is C", "C"),
    ("I would choose option D.", "D"),
    ("Correct answer: [A]", "A"),
    ("Answer: B\n\nExplanation: A is wrong because pneumonia presents acutely.", "B"),
    ("Both A and C are plausible, but the best answer is C.", "C"),
    # the option's own text
    ("Tuberculosis", "B"),
    ("lung cancer", "D"),
    ("The most likely diagnosis is sarcoidosis.", "E"),
    # thinking output
    ("<unused94>thought\nA? No: the cavitation points to B.<unused95>Answer: B", "B"),
    ("<think>Pneumonia seems likely at first, A.</think>\nThe answer is C.", "C"),
    ("<unused94>thought\nThe answer is A, maybe.", None),  # never finished thinking
    # wrong-answer traps
    ("The answer is not A, it is C.", "C"),
    ("The answer isn't B. Final answer: D", "D"),
    ("The answer is a viral infection.", None),  # "a" is an article, not option A
    ("A 45-year-old man with a cough should get a chest X-ray.", None),
    ("I am not sure.", None),
    ("", None),
    ("Pneumonia or tuberculosis could both fit.", None),  # two options' texts: undecided
    ("Answer: F", None),  # no option F
    ("So (D) fits best.", "D"),
]


def test_at_least_thirty_formats_including_traps():
    assert len(GOLDEN) >= 30
    assert sum(1 for _, want in GOLDEN if want is None) >= 5


@pytest.mark.parametrize(("text", "want"), GOLDEN)
def test_parse_choice(text, want):
    assert parse_choice(text, OPTIONS) == want


def test_an_option_text_inside_another_does_not_count():
    opts = {"A": "HIV", "B": "HIV 2", "C": "Hepatitis B"}
    assert parse_choice("HIV 2 is the commonest in West Africa", opts) == "B"
    assert parse_choice("It is hepatitis b.", opts) == "C"


def test_letters_beyond_the_options_are_ignored():
    assert parse_choice("Answer: D", {"A": "yes", "B": "no", "C": "maybe"}) is None
    assert parse_choice("yes", {"A": "yes", "B": "no", "C": "maybe"}) == "A"


def test_strip_thinking():
    assert strip_thinking("<unused94>thought\nhmm<unused95>B") == "B"
    assert strip_thinking("<unused94>thought\nhmm") is None
    assert strip_thinking("plain") == "plain"


LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@pytest.mark.parametrize(("text", "want"), [
    ("Cardiomegaly, Pleural Effusion", ("Cardiomegaly", "Pleural Effusion")),
    ("cardiomegaly and bilateral pleural effusions", ("Cardiomegaly", "Pleural Effusion")),
    ("No Finding", ()),
    ("There is no pleural effusion. Mild edema.", ("Edema",)),
    ("Without consolidation; atelectasis at the left base.", ("Atelectasis",)),
    ("Negative for cardiomegaly.", ()),
    ("pleural_effusion", ("Pleural Effusion",)),
])
def test_parse_labels(text, want):
    assert parse_labels(text, LABELS) == want


@pytest.mark.parametrize(("text", "gold", "want"), [
    ("Yes, there is a mass.", "yes", "yes"),
    ("No.", "no", "no"),
    ("The answer is no", "yes", "no"),
    ("Left lung.\nThe lesion is in the left lower lobe.", "left lung", "Left lung"),
    ("Answer: liver", "liver", "liver"),
])
def test_parse_short(text, gold, want):
    assert parse_short(text, gold) == want
