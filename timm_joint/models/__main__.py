"""``python -m timm_joint.models``: the README's model table, computed from the registry.

For every registered name (``timm.list_models('gradresnet*')``): the stem, the default input size,
the parameter count (classifier and side maps included, at the default number of classes), the
FLOPs of one image's classification forward and of one blind denoising call (forward + input
gradient), and the pretrained tags its configs name. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products only, one
multiply-add counted as 2 FLOPs.
"""
import argparse
from typing import Any, Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode
import timm

import timm_joint  # noqa: F401  (registers the models)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the tensor operations ``fn()`` runs (one multiply-add = 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_rows(pattern: str = 'gradresnet*') -> List[Dict[str, Any]]:
    """One row per registered name: the figures of the README's model table (raw counts)."""
    rows = []
    for name in timm.list_models(pattern):
        model = timm.create_model(name, pretrained=False).eval()
        cfg = model.pretrained_cfg
        x = torch.rand(1, *cfg['input_size'])
        with torch.no_grad():
            cls_flops = count_flops(lambda: model(x))
        # The counter's module hooks refuse autograd.grad with respect to a leaf: differentiate with
        # respect to a non-leaf copy of x instead (the same backward is counted).
        x_in = torch.rand(1, *cfg['input_size']).requires_grad_(True) * 1.
        den_flops = count_flops(lambda: model.denoise(x_in))
        conv = model.stem[0]
        rows.append({
            'model': name,
            'stem': f'{conv.kernel_size[0]}x{conv.kernel_size[1]} s{conv.stride[0]}',
            'input_size': tuple(cfg['input_size'][1:]),
            'params': sum(p.numel() for p in model.parameters()),
            'flops_classify': cls_flops,
            'flops_denoise': den_flops,
            'tags': [p.split('.', 1)[1] for p in timm.list_pretrained(f'{name}.*')],
        })
    return rows


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """The README table of ``model_rows``."""
    header = ['model', 'stem', 'input size', 'params (M)', 'GFLOPs (classify)', 'GFLOPs (denoise)',
              'pretrained tags (configured)']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    for r in rows:
        cells = [f"`{r['model']}`", r['stem'], 'x'.join(str(s) for s in r['input_size']),
                 f"{r['params'] / 1e6:.2f}", f"{r['flops_classify'] / 1e9:.3f}",
                 f"{r['flops_denoise'] / 1e9:.3f}", ', '.join(r['tags']) or '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pattern', default='gradresnet*', help="timm.list_models filter (default 'gradresnet*')")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = model_rows(args.pattern)
    if not rows:
        raise SystemExit(f'no registered model matches {args.pattern!r}')
    print(markdown_table(rows))
    print()
    print('GFLOPs: one image at the input size, counted by torch.utils.flop_counter.FlopCounterMode '
          '(convolutions and matrix products; one multiply-add = 2 FLOPs). "classify" is the forward '
          '(logits); "denoise" is the blind D(y) = y - grad E(y), a forward and an input-gradient '
          'backward. Parameters include the classifier (default classes) and the side maps. '
          'Pretrained tags are those the configs name (timm.list_pretrained); '
          'whether the weights are published on the Hub is not checked here.')


if __name__ == '__main__':
    main()
