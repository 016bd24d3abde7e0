"""``python -m surgeon_export`` (and ``torchrun ... -m surgeon_export``): the CLI."""

from surgeon_export.cli import main

main()
