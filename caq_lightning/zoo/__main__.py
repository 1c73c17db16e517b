"""python -m caq_lightning.zoo tiny [tiny-realistic ...]: build the builtin pairs and report their refusal rates."""

import json
import sys
import time

from caq_lightning.zoo import _builtin
from caq_lightning.zoo.tiny import _report

for builtin in sys.argv[1:] or ["tiny"]:
    start = time.perf_counter()
    built = _builtin(builtin)
    print(builtin, built.root, f"{time.perf_counter() - start:.1f}s", json.dumps(_report(built), indent=1))
