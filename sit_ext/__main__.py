"""``python -m sit_ext``: the same as the ``sit-ext`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
