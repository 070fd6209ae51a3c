"""``python -m infra.sandbox serve``: run the sandbox server in the foreground (see :mod:`infra.sandbox.serve`)."""

import sys

from infra.sandbox.serve import main

sys.exit(main())
