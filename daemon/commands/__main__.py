"""Print the commands section of docs/PROTOCOL.md from the command docstrings."""

from cgtree.daemon.commands import protocol_markdown

print(protocol_markdown(), end="")
