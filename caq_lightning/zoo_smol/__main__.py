"""python -m caq_lightning.zoo_smol [field=value ...]: the same as python -m caq_lightning.zoo.smol."""

import runpy

runpy.run_module("caq_lightning.zoo.smol", run_name="__main__", alter_sys=True)
