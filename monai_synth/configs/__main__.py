"""``python -m monai_synth.configs <bundle_root> <stage> [--multi_gpu]``: the ``--config_file`` list of a stage."""

from __future__ import annotations

import sys

from monai_synth.configs import STAGE_FILES, config_files

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--multi_gpu"]
    if len(args) != 2:
        sys.exit(f"usage: python -m monai_synth.configs <bundle_root> <{'|'.join(STAGE_FILES)}> [--multi_gpu]")
    print(repr(config_files(args[0], args[1], multi_gpu="--multi_gpu" in sys.argv)))
