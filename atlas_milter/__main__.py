"""Allows `python -m atlas_milter`."""
from atlas_milter.cli import main

raise SystemExit(main())
