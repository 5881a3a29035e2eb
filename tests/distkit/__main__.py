"""``python -m distkit run|resume|multi ...``: the CLI with the test algorithms and hooks."""

from distkit import main

raise SystemExit(main())
