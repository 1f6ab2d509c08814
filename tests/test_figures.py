"""Figures: models named by short labels, legends beside the data, axes sized to the data, class names."""

from timm_joint import figures
from timm_joint.data import QUICKSTART_IMAGES, create_eval_dataset, prepare_quickstart
from timm_joint.evaluate import Denoising, _class_names, model_label

LONG = 'local-dir:runs/sweeps/quickstart-600/timm_resnet18,_classification/export/best'
SHORT = 'local-dir:runs/quickstart/export/best'
LABELS = {SHORT: 'gradresnet_tiny_joint (joint)', LONG: 'resnet18 (classification)'}


def _legend_beside_the_data(fig):
    """Every legend of the figure lies outside every panel (drawn first, so extents are final)."""
    fig.canvas.draw()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), 'the legend covers a panel'
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_psnr_axis_spans_the_data_not_the_training_range():
    results = {'psnr': {'blind': {'15': 30., '25': 27., '50': 23.}, 'cond_true': {'15': 30.2, '25': 27.3, '50': 23.4}},
               'noisy_psnr': {'15': 24.6, '25': 20.2, '50': 14.2}}
    fig = figures._psnr_vs_sigma_figure(results, train_sigma_max_255=100., title='gradresnet_tiny_joint (joint)')
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    assert lo == 0 and 50 <= hi <= 55, (lo, hi)  # was 0-100: half the axis without data
    texts = _legend_beside_the_data(fig)
    assert 'training range (sigma <= 100)' in texts
    assert 'gradresnet_tiny_joint (joint)' in ax.get_title()


def _robustness():
    cells = {'0': 40., '1': 30., '8': 10.}
    return {'accuracy': {SHORT: {'linf': {'0': cells, '25': cells}, 'l2': {'0': cells}},
                         LONG: {'linf': {'0': cells}, 'l2': {'0': cells}}},
            'epsilon_units': {'linf': '1/255', 'l2': 'L2'}, 'robustbench': {'linf': '8', 'l2': '0.5'}}


def test_robustness_legend_names_models_by_label_beside_the_panels():
    texts = _legend_beside_the_data(figures._robustness_figure(_robustness(), labels=LABELS))
    assert 'resnet18 (classification), sigma=0' in texts and 'gradresnet_tiny_joint (joint), sigma=25' in texts
    assert not any('/' in t for t in texts), texts  # no paths
    assert len(texts) == len(set(texts)) == 4  # one entry per line, not one per panel


def test_certified_legend_names_models_by_label_beside_the_panels():
    curve = {'curve': {'radius': [0.1, 0.2], 'accuracy': [50., 25.]}}
    certify = {'sigmas': ['25', '50'], 'max_radius': {'25': 0.3, '50': 0.6}, 'n': 100, 'alpha': 0.001,
               'models': {SHORT: {'own': {'25': curve, '50': curve}, 'denoised': {'25': curve, '50': curve}},
                          LONG: {'own': {'25': curve, '50': curve}}},
               'outside_training': {LONG: ['50']}}
    fig = figures._certified_accuracy_figure(certify, labels=LABELS)
    texts = _legend_beside_the_data(fig)
    assert 'resnet18 (classification), own' in texts and not any('/' in t for t in texts)
    notes = [t.get_text() for t in fig.axes[1].texts]
    assert notes == ['resnet18 (classification): sigma outside its training noise'] and not fig.axes[0].texts


def test_reliability_legend_is_beside_the_bars(tmp_path):
    bins = {'edges': [0., 0.5, 1.], 'count': [3, 5], 'accuracy': [0.9, 0.95], 'confidence': [0.3, 0.8]}
    figures.reliability_diagram(bins, tmp_path / 'r.png', title='t')
    assert (tmp_path / 'r.png').is_file()


def test_model_labels():
    export = {'architecture': 'resnet18', 'config': {'timm_joint': {'task': 'classification'}}, 'name': LONG}
    assert model_label(export) == 'resnet18 (classification)'
    assert model_label({'architecture': 'resnet18', 'config': None, 'name': 'resnet18'}) == 'resnet18'
    assert model_label(export, 'my baseline') == 'my baseline'
    assert model_label({'architecture': None, 'name': 'hf-hub:org/some_model'}) == 'some_model'


def test_denoising_grid_rows_are_named_by_class(tmp_path):
    qs = prepare_quickstart(tmp_path / 'qs', patch_size=16, train_per_class=2, val_per_class=1, short_side=96)
    names = _class_names(create_eval_dataset('', str(qs), img_size=16))
    assert names == sorted(QUICKSTART_IMAGES)
    import timm
    model = timm.create_model('gradresnet_tiny_joint', num_classes=10)
    metric = Denoising(model, [25], has_labels=True, grid_positions=set(), training={}, class_names=names)
    assert metric._class_title(1) == 'brick'
    metric.has_labels = False
    assert metric._class_title(1) == 'predicted: brick'
    assert Denoising(model, [25], has_labels=True, grid_positions=set(), training={})._class_title(3) == 'class 3'
