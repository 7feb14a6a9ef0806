"""`python -m datamover` is the CLI."""

from datamover.cli import main

if __name__ == "__main__":  # reader processes re-import this module; they must not run the CLI
    main()
