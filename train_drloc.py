#!/usr/bin/env python3
"""Train a timm model with the DRLoc auxiliary loss: timm's train.py flags plus --drloc-*.

    python train_drloc.py /data --model swin_tiny_patch4_window7_224 --drloc-lambda 0.5

The script is `timm_drloc.train`; importing this file gives that module itself, so code written
against timm's train.py (`import train_drloc as train; train.main()`, monkeypatching
`train.create_model`) works unchanged.
"""
import sys

import timm_drloc.train

if __name__ == '__main__':
    timm_drloc.train.run()
else:
    sys.modules[__name__] = timm_drloc.train
