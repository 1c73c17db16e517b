"""python -m caq_lightning.zoo_smol [field=value ...]: the same as python -m caq_lightning.zoo.smol."""

import sys

from caq_lightning.zoo.smol import main

main(sys.argv[1:])
