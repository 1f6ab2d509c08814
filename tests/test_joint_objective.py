"""Guard against the starved classifier (issue 7): under the default joint recipe the classification
loss must fall at least 0.8 times as much as it does when training for classification alone."""
import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    from timm_joint.data import prepare_quickstart
    root = tmp_path_factory.mktemp('objective') / 'qs'
    prepare_quickstart(root, patch_size=16, train_per_class=16, val_per_class=2, short_side=96,
                       images=('astronaut', 'brick', 'coffee', 'gravel'))
    return root


def _epoch_cls_losses(train_joint, data_dir, out, task):
    from accelerate.state import AcceleratorState, GradientState, PartialState
    for s in (AcceleratorState, PartialState):
        s._reset_state()
    GradientState._reset_state()
    # The recipe (lambda, sigma ranges, optimizer, lr) comes from the quickstart config: a change of default
    # that starves the classifier fails here. Measured: classification only falls 0.60, the default (a
    # constant lambda 100) 0.73, the per-image sum (--den-reduction sum, lambda 1) 0.40, lambda 1000 0.37.
    run_dir = train_joint.main([
        '-c', str(ROOT / 'configs' / 'quickstart.yaml'),
        '--num-classes', '4', '--img-size', '16', '--data-dir', str(data_dir), '-b', '8',
        '--den-batch-size', '8', '--epochs', '16', '--eval-interval', '1', '--val-psnr-sigmas', '25',
        '--no-progress', '--seed', '0', '--task', task, '--output', str(out), '--experiment', task])
    rows = list(csv.DictReader(open(run_dir / 'summary.csv')))
    return [float(r['train_loss_cls']) for r in rows]


def test_joint_classification_loss_falls_nearly_as_much_as_classification_only(data_dir, tmp_path):
    from timm_joint import train as train_joint
    cls = _epoch_cls_losses(train_joint, data_dir, tmp_path, 'classification')
    joint = _epoch_cls_losses(train_joint, data_dir, tmp_path, 'joint')
    assert len(cls) == len(joint) == 16
    drop_cls = cls[0] - min(cls[-2:])
    drop_joint = joint[0] - min(joint[-2:])
    assert drop_cls > 0.1, f'classification-only did not learn: {cls}'
    assert drop_joint >= 0.8 * drop_cls, f'starved classifier: joint {joint} vs classification-only {cls}'
