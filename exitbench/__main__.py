"""``python -m exitbench``: the same as the ``exitbench`` command."""

import sys

from exitbench.cli import main

sys.exit(main())
