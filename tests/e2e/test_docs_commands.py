"""The commands and links of README.md and docs/, checked as written, without running anything long.

Every `softmoe ...` command in README.md, docs/*.md and docs/results/*/README.md (in a code block, or an inline
code span that starts with `softmoe`; `python -m softmoe.train` and `torchrun ... -m softmoe.train` count as
`softmoe train`) must name a real subcommand, and every `--flag` in it must be one of that subcommand's own
option strings, spelled out in full (argparse would accept an abbreviation; the docs should not rely on it). A
concrete command in a code block (not a usage synopsis with `[--flag]` or `a|b`) is also parsed by the CLI's
own parser (`softmoe.cli.build_parser`), the way `softmoe.cli.main` parses it, without calling the command:
a misspelt flag, a missing required one or a bad choice fails. `softmoe lm-eval` passes its arguments to
lm-eval and is checked for its name only. A `python benchmarks/<script>.py ...` command must name an existing
script, and its `--flags` must be ones the script (or a benchmarks module it imports) declares with
`add_argument` (read from the source, nothing imported).

Every relative link or image in the same files must point to an existing file, and a `#fragment` to a heading
of that file (GitHub's heading ids).

tests/e2e/test_readme.py runs the README's command block itself, on the tiny preset.

Run: .venv/bin/python -m pytest -q tests/e2e/test_docs_commands.py
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from softmoe.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "docs" / "results").glob("*/README.md")])
SHELL_OPERATORS = {";", "&", "&&", "|", "||", ">", ">>", "<", ">&", "2>", "2>&1", "(", ")"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def fenced_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced code block that is not Python, YAML or JSON."""
    blocks, lines, start, language = [], text.splitlines(), None, ""
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if start is None:
                start, language = number + 1, line.strip()[3:].strip()
            else:
                if language not in ("python", "yaml", "json"):
                    blocks.append((start, "\n".join(lines[start - 1:number - 1])))
                start = None
    return blocks


def without_code(text: str) -> str:
    """`text` with fenced blocks and inline code spans blanked (links are read from prose only)."""
    text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def block_commands(body: str) -> list[tuple[int, str]]:
    """(line offset, line) of the shell lines of a code block, `\\` continuations joined."""
    found, pending, first = [], "", 0
    for offset, line in enumerate(body.splitlines()):
        if not pending:
            first = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            found.append((first, (pending + line).strip()))
        pending = ""
    return found


def softmoe_argv(line: str) -> list[str] | None:
    """The arguments after `softmoe` (or `-m softmoe.train`, as ["train", ...]) in a shell line, cut at the first
    shell operator and at a comment; None when the line runs no softmoe command."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unclosed quote: not a command line
        return None
    for i, token in enumerate(tokens):
        if token == "softmoe" or token.endswith("/softmoe"):
            if not all(t in ("nohup", "time") or re.fullmatch(r"\w+=\S*", t) for t in tokens[:i]):
                return None  # `softmoe` as a word, not the command (a layout listing, prose)
            argv = tokens[i + 1:]
        elif token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "softmoe.train":
            argv = ["train", *tokens[i + 2:]]
        else:
            continue
        for j, item in enumerate(argv):
            if item in SHELL_OPERATORS or set(item) <= set(";&|<>()"):
                return argv[:j]
        return argv
    return None


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def flag_problems(parser: argparse.ArgumentParser, argv: list[str], where: str) -> list[str]:
    """Subcommand names and `--flag` spellings in `argv` (a synopsis is fine: brackets, `a|b`, placeholders)."""
    problems, current, path = [], parser, ["softmoe"]
    rest = list(argv)
    while subparsers(current) and rest and not rest[0].startswith("-"):
        names = rest.pop(0).split("|")  # `softmoe eval|generate --device`: both verbs
        for name in names:
            if name not in subparsers(current):
                problems.append(f"{where}: `{' '.join(path)} {name}` is not a subcommand")
        if problems or len(names) > 1:
            parsers = [subparsers(current)[name] for name in names if name in subparsers(current)]
            return problems + [p for sub in parsers for p in _flags(sub, rest, where, path + names)]
        path.append(names[0])
        current = subparsers(current)[names[0]]
        if path == ["softmoe", "lm-eval"]:  # lm-eval's own arguments
            return []
    return problems + _flags(current, rest, where, path)


def _flags(parser: argparse.ArgumentParser, argv: list[str], where: str, path: list[str]) -> list[str]:
    known = {option for action in parser._actions for option in action.option_strings}
    problems = []
    for item in argv:
        for flag in re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", item.split("=", 1)[0] if item.startswith("-") else ""):
            if flag not in known:
                problems.append(f"{where}: `{' '.join(path)}` has no option {flag}")
    return problems


def parse_problem(parser: argparse.ArgumentParser, argv: list[str], where: str) -> str | None:
    """Parse `argv` as softmoe.cli.main does (key=value items after a flag are overrides); None when it parses."""
    if argv[:1] == ["lm-eval"]:
        return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = parser.parse_known_args(argv)
    except SystemExit as exit:
        if exit.code == 0:  # --version, --help
            return None
        return f"{where}: softmoe {' '.join(argv)}\n  {err.getvalue().strip().splitlines()[-1]}"
    if extra and (not hasattr(args, "overrides") or any(i.startswith("-") or "=" not in i for i in extra)):
        return f"{where}: softmoe {' '.join(argv)}\n  unrecognized arguments: {' '.join(extra)}"
    return None


def is_synopsis(line: str) -> bool:
    return bool(re.search(r"\[-|\|(?![|&])|\.\.\.", line))


def commands(path: Path) -> list[tuple[str, list[str], bool]]:
    """(where, argv, parse it) for every softmoe command in `path`."""
    text, found = path.read_text(), []
    for start, body in fenced_blocks(text):
        for offset, line in block_commands(body):
            argv = softmoe_argv(line)
            if argv is not None:
                found.append((f"{rel(path)}:{start + offset}", argv, not is_synopsis(line)))
    prose = without_fences(text)
    for match in re.finditer(r"(?<!`)`((?:\S*/)?softmoe [^`]+)`", prose):
        argv = softmoe_argv(" ".join(match.group(1).split()))
        if argv:
            found.append((f"{rel(path)}:{prose.count(chr(10), 0, match.start()) + 1} (inline)", argv, False))
    return found


def without_fences(text: str) -> str:
    """`text` with the fenced blocks' lines blanked (line numbers kept)."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            inside = not inside
            out.append("\n")
        else:
            out.append("\n" if inside else line)
    return "".join(out)


def check_commands(paths: list[Path]) -> tuple[int, list[str]]:
    parser, seen, problems = build_parser(), 0, []
    for path in paths:
        for where, argv, parse in commands(path):
            seen += 1
            flags = flag_problems(parser, argv, where)
            problem = parse_problem(parser, argv, where) if parse and not flags else None
            problems += flags + ([problem] if problem else [])
    return seen, problems


def script_commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(where, script path, arguments) of every `python benchmarks/<script>.py ...` line in a code block."""
    found = []
    for start, body in fenced_blocks(path.read_text()):
        for offset, line in block_commands(body):
            tokens = line.split("#")[0].split()
            for i, token in enumerate(tokens[:-1]):
                if token.endswith("python") and tokens[i + 1].startswith("benchmarks/"):
                    rest = tokens[i + 2:]
                    cut = next((j for j, t in enumerate(rest) if set(t) <= set(";&|<>()")), len(rest))
                    found.append((f"{rel(path)}:{start + offset}", tokens[i + 1], rest[:cut]))
    return found


def declared_flags(script: Path) -> set[str]:
    """The option strings of every add_argument call in `script` and the benchmarks modules it imports."""
    flags, todo, done = set(), [script], set()
    while todo:
        source = todo.pop()
        if source in done or not source.exists():
            continue
        done.add(source)
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                todo.append(REPO / (node.module.replace(".", "/") + ".py"))
    return flags


def test_every_benchmark_command_in_the_docs_names_its_flags():
    problems, seen = [], 0
    for path in DOCS:
        for where, script, argv in script_commands(path):
            seen += 1
            if not (REPO / script).is_file():
                problems.append(f"{where}: no script {script}")
                continue
            known = declared_flags(REPO / script)
            problems += [f"{where}: {script} has no option {flag}" for flag in
                         (item.split("=", 1)[0] for item in argv if item.startswith("--")) if flag not in known]
    assert seen >= 5, f"only {seen} benchmark commands found: is the extraction broken?"
    assert not problems, "\n".join(problems)


def test_every_softmoe_command_in_the_docs_parses():
    seen, problems = check_commands(DOCS)
    assert seen >= 30, f"only {seen} softmoe commands found: is the extraction broken?"
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_misspelt_flag_and_subcommand(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\nsoftmoe eval --checkpiont runs/x --tasks none\n```\n"
                   "Inline: `softmoe compare --study s.yaml --jbos 2` and `softmoe evaluate --splits val`.\n"
                   "```\nsoftmoe train --config c.yaml --max-batch 3\n```\n")
    seen, problems = check_commands([doc])
    assert seen == 4
    text = "\n".join(problems)
    for expected in ("no option --checkpiont", "no option --jbos", "`softmoe evaluate` is not a subcommand",
                     "no option --max-batch"):
        assert expected in text, text


def test_the_script_check_sees_a_misspelt_flag(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\n.venv/bin/python benchmarks/bench_ops.py --repeatz 15 --json  # a typo\n```\n")
    [(where, script, argv)] = script_commands(doc)
    assert argv == ["--repeatz", "15", "--json"]
    known = declared_flags(REPO / script)
    assert "--json" in known and "--repeats" in known and "--repeatz" not in known


def test_a_concrete_command_is_parsed():
    parser = build_parser()
    assert parse_problem(parser, ["eval", "--tasks", "none"], "x") is not None  # --checkpoint is required
    assert parse_problem(parser, ["data", "fetch", "--corpus", "wiki"], "x") is not None  # not a choice
    assert parse_problem(parser, ["train", "--config", "c.yaml", "--resume", "train.steps=2"], "x") is None


def github_anchors(path: Path) -> set[str]:
    """The ids GitHub gives the headings of a markdown file."""
    anchors, counts = set(), {}
    for line in without_fences(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_point_to_existing_files(path):
    text, broken = without_code(path.read_text()), []
    for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in github_anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {rel(linked)}")
    assert not broken, f"{rel(path)}: " + "; ".join(broken)


def test_the_docs_are_a_reference_not_a_diary():
    """README.md and docs/ carry no history of how the work went (that lives in CHANGELOG.md)."""
    import re

    root = Path(__file__).resolve().parents[2]
    diary = re.compile(r"issue [0-9]+|later that day|that evening|that afternoon", re.IGNORECASE)
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    found = [f"{page.relative_to(root)}:{i}: {line.strip()[:80]}" for page in pages
             for i, line in enumerate(page.read_text().splitlines(), 1) if diary.search(line)]
    assert not found, "\n".join(found)


def test_the_walkthrough_names_every_file_of_the_package():
    """README.md says docs/walkthrough.md lists every file: every .py and .c file under softmoe/ is named in its
    "Every file, by stage" block."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "walkthrough.md").read_text()
    block = text[text.index("Every file, by stage:"):]
    missing = [str(path.relative_to(root)) for path in sorted((root / "softmoe").rglob("*"))
               if path.suffix in (".py", ".c") and path.name not in block]
    assert not missing, f"docs/walkthrough.md does not name {missing}"
