"""`python -m timm_drloc.train ...`: the same as train_drloc.py."""
from . import run

run()
