"""``python -m training.visualize``."""

from training.visualize.command import main

raise SystemExit(main())
