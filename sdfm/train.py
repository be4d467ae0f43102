"""``python -m sdfm.train ARGS`` is ``sdfm train ARGS``: the entry point that runs as one process or
as every rank of a torchrun / accelerate job. The trainer itself is ``sdfm.trainer``."""

import sys

if __name__ == "__main__":
    from sdfm.cli import main

    main(["train", *sys.argv[1:]])
