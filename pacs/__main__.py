"""`python -m pacs` is the same as the `pacs` console script."""
import sys

from pacs.cli import main

sys.exit(main())
