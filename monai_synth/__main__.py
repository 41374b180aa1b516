"""Allow ``python -m monai_synth``."""

import sys

from monai_synth.cli import main

sys.exit(main())
