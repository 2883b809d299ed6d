"""`python -m llama2` runs the `llama2` command line."""

from llama2.cli import main

raise SystemExit(main())
