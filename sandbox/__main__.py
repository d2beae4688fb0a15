"""``python -m sandbox`` (used by ``accelerate launch -m sandbox run RECIPE``)."""

from sandbox.cli import main

if __name__ == "__main__":
    main()
