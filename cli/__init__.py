"""Command-line front end of gpconv (installed as the ``gpconv`` console script)."""
