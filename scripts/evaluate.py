"""FID / IS / KID of a checkpoint or of two image folders; the same as ``sagan evaluate``.

    python scripts/evaluate.py --ckpt outputs/digits/checkpoints/last.ckpt --num-samples 1000 --metrics fid,kid --floor
    python scripts/evaluate.py --folders generated/ real/ --metrics fid
"""

import sys

from sagan.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
