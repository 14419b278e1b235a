"""`python -m florql …` is the `florql` command."""

import sys

from florql.cli import main

sys.exit(main())
