"""``python -m mmattn``: same entry point as the ``mmattn`` console script."""

from mmattn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
