"""Images, grids, interpolations and attention maps from a checkpoint; the same as ``sagan generate``.

    python scripts/generate.py --ckpt outputs/digits/checkpoints/last.ckpt --outdir out --per-class --num 10 --grid
    python scripts/generate.py --ckpt outputs/digits/checkpoints/last.ckpt --outdir out --seeds 0-3 --attention-maps
"""

import sys

from sagan.generate import main

if __name__ == "__main__":
    sys.exit(main())
