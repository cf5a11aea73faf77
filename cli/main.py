"""Entry point of the ``gpconv`` console script: the app plus every command module."""

from .app import app
from . import surgery  # noqa: F401  (registers shrink, report, densify)


def main():
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
