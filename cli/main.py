"""Entry point of the ``gpconv`` console script: the app plus every command module."""

from .app import app
from . import surgery  # noqa: F401  (registers shrink, report, densify)
from . import bench  # noqa: F401
from . import recovery  # noqa: F401  (registers distill, train, eval, generate)
from . import recipes  # noqa: F401
from . import export  # noqa: F401  (registers export)


def main():
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
