"""`python -m xlora.cli` (e.g. under torchrun): the same app as the `xlora` command."""

from xlora.cli import main

main()
