"""Helpers for the reliability suite: assert an exact error (or warning) text and, on request, record it.

With ``HF_FWSVD_RECORD_CASES=<file>`` set, every checked case appends ``{test, entry, type, message}`` as a JSON line
to that file; `docs/reliability.md` is built from those lines, so its table shows the text the code really produces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = "the a movie was good bad great awful plot acting long short".split()


def _record(kind: str, message: str, entry: str, replacements: dict[str, str] | None) -> None:
    target = os.environ.get("HF_FWSVD_RECORD_CASES")
    if not target:
        return
    for old, new in (replacements or {}).items():
        message = message.replace(old, new)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"test": test, "entry": entry, "type": kind, "message": message}) + "\n")


@contextlib.contextmanager
def fails_with(
    exception: type[BaseException],
    message: str,
    entry: str = "Python API",
    replacements: dict[str, str] | None = None,
) -> Iterator[None]:
    """Expect `exception` whose text is exactly `message`."""
    with pytest.raises(exception) as info:
        yield
    assert str(info.value) == message
    _record(type(info.value).__name__, message, entry, replacements)


def expect_warning(
    caplog: pytest.LogCaptureFixture,
    logger: str,
    message: str,
    entry: str = "Python API",
    replacements: dict[str, str] | None = None,
) -> None:
    """Assert `logger` logged exactly `message` at WARNING level (call after the code ran under `caplog`)."""
    found = [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]
    assert message in found, found
    _record("warning", message, entry, replacements)


def record_text(kind: str, message: str, entry: str, replacements: dict[str, str] | None = None) -> None:
    """Record a message checked some other way (e.g. a subprocess's stderr)."""
    _record(kind, message, entry, replacements)


def word_tokenizer(pad: bool = True, eos: bool = False) -> PreTrainedTokenizerFast:
    """A tiny whitespace word-level tokenizer (ids < 16), optionally without a pad token."""
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{word: index + 3 for index, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokens = {"pad_token": "[PAD]"} if pad else {}
    if eos:
        tokens["eos_token"] = "[EOS]"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)


AREAS = (
    "config",
    "calibration",
    "importances",
    "checkpoints",
    "completeness",
    "output",
    "saving",
    "concurrency",
    "precision",
    "options",
    "streaming",
    "inputs",
    "cli",
)


def render_table(path: str) -> str:
    """Markdown tables, one per area (test file), of the cases recorded in `path` (one JSON object a line)."""
    sections: dict[str, list[str]] = {area: [] for area in AREAS}
    seen = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            case = json.loads(line)
            key = (case["test"], case["message"])
            if key in seen:
                continue
            seen.add(key)
            filename, test = case["test"].split("::", 1)
            area = os.path.basename(filename).removeprefix("test_reliability_").removesuffix(".py")
            message = case["message"].replace("|", "\\|").replace("\n", " ")
            sections.setdefault(area, []).append(f"| `{test}` | {case['entry']} | {case['type']} | {message} |")
    lines = []
    for area, rows in sections.items():
        if rows:
            header = ["| Case (test) | Entry point | Raises / logs | Exact text |", "|---|---|---|---|"]
            lines += [f"### {area.capitalize()} (`tests/test_reliability_{area}.py`)", "", *header, *rows, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(render_table(sys.argv[1]))
