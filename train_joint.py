#!/usr/bin/env python3
"""Joint classification-denoising training: the thin entry that launchers run from a source checkout.

    python train_joint.py -c configs/quickstart.yaml
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
        train_joint.py -c configs/cifar10_joint.yaml --data-dir /data/cifar10   # the flags: no defaults warning
    torchrun --nproc_per_node 2 train_joint.py ...      # several CPU processes (gloo)

The training code is ``timm_joint/train.py`` (``main``, ``train_one_epoch``, ``validate``); an installed
package runs the same with ``timm-joint-train`` or ``python -m timm_joint.train``.
"""
import sys

from timm_joint.train import cli, main  # noqa: F401  (main: the in-process entry, as timm's train.main)

if __name__ == '__main__':
    sys.exit(cli())
