"""``python -m cca_fast.cli``: the ``cca`` command."""
import sys

from cca_fast.cli.main import main

sys.exit(main())
