"""The `cca` command line (one module per subcommand)."""
from cca_fast.cli.main import main

__all__ = ["main"]
