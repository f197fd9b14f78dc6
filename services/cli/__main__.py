"""``python -m services.cli``: the ``chiron`` command."""

from services.cli import main

main()
