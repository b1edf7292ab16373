"""docs/PROTOCOL.md stays in step with the code: every registered command is documented with its
docstring verbatim, and the error code table is the code's."""

from __future__ import annotations

import re
from pathlib import Path

from cgtree.daemon.commands import COMMANDS, protocol_markdown
from cgtree.daemon.protocol import ERROR_CODES

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
BEGIN = "<!-- commands:begin"
END = "<!-- commands:end -->"


def doc_text() -> str:
    return PROTOCOL_MD.read_text()


def test_every_registered_command_appears_in_protocol_md():
    text = doc_text()
    missing = [name for name in COMMANDS if f"### `{name}`" not in text]
    assert not missing, f"commands missing from docs/PROTOCOL.md: {missing}"


def test_the_commands_section_is_the_command_docstrings_verbatim():
    text = doc_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    section = text[start:text.index(END)]
    assert section == protocol_markdown(), (
        "docs/PROTOCOL.md is out of step with the command docstrings: regenerate the section between "
        "the markers with `python -m cgtree.daemon.commands`"
    )


def test_every_command_docstring_specifies_request_reply_and_errors():
    for name, module in COMMANDS.items():
        doc = module.__doc__ or ""
        for part in ("Request:", "Reply:", "Errors:"):
            assert part in doc, f"command {name}: docstring lacks {part!r}"


def test_the_error_code_table_lists_exactly_the_codes_in_use():
    rows = re.findall(r"^\| `([a-z_]+)` \| (yes|no) \|", doc_text(), flags=re.MULTILINE)
    assert {code: retryable == "yes" for code, retryable in rows} == {code: r for code, (r, _) in ERROR_CODES.items()}
