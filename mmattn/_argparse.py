"""`OneLineParser`: the argument parser of every mmattn command line (`mmattn`, `python -m mmattn.vlm.eval`,
`python -m mmattn.diffusion.train_lora`): a bad argument is one line on stderr and exit status 2, no usage block
and no traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """`error(message)` prints `prog: error: message` on one line (whitespace folded) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")
