"""python -m caq_lightning.zoo [--quiet] tiny [tiny-realistic smol ...]: build the builtin pairs and report their
refusal rates. A bad input (e.g. a public set that is neither in $CAQ_DATA_DIR nor reachable) is one error line."""

import json
import sys
import time

from caq_lightning.errors import CAQError, fail
from caq_lightning.progress import set_quiet
from caq_lightning.zoo import _builtin
from caq_lightning.zoo.tiny import _report

args = sys.argv[1:]
if "--quiet" in args:
    set_quiet()
    args = [a for a in args if a != "--quiet"]
for builtin in args or ["tiny"]:
    start = time.perf_counter()
    try:
        built = _builtin(builtin)
    except CAQError as err:
        fail(str(err))
    print(builtin, built.root, f"{time.perf_counter() - start:.1f}s", json.dumps(_report(built), indent=1))
