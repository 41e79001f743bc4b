"""`python -m vaekit.cli` (what `accelerate launch -m vaekit.cli` and `torchrun -m vaekit.cli` run)."""

import sys

from vaekit.cli.main import main

sys.exit(main())
