"""Print the commands section of docs/PROTOCOL.md from the command docstrings, or with
``--write PATH`` replace that section (between its markers) in the file."""

import sys

from cgtree.daemon.commands import protocol_markdown

BEGIN, END = "<!-- commands:begin", "<!-- commands:end -->"

if len(sys.argv) == 3 and sys.argv[1] == "--write":
    with open(sys.argv[2]) as fh:
        text = fh.read()
    start = text.index("\n", text.index(BEGIN)) + 1
    text = text[:start] + protocol_markdown() + text[text.index(END):]
    with open(sys.argv[2], "w") as fh:
        fh.write(text)
else:
    print(protocol_markdown(), end="")
