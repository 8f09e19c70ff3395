"""The `curate` command-line interface: one module per command, heavy imports inside commands."""
