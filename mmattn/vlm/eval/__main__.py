"""`python -m mmattn.vlm.eval {pope,chair} ...`"""

import sys

from .runner import main

sys.exit(main())
