"""`python -m fedlm` is the `fedlm` command."""

from fedlm.cli import app

app()
