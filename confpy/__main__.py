"""`python -m confpy` runs the command-line interface."""

from confpy.cli import main

raise SystemExit(main())
