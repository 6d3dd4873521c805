"""``python -m gactor`` is the ``gactor`` command."""

from gactor.cli import main

if __name__ == "__main__":
    main()
