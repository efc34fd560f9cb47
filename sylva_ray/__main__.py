"""``python -m sylva_ray`` is ``sylva-ray``."""

import sys

from sylva_ray.cli import main

sys.exit(main())
