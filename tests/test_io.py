"""One implementation per concern: the weights reader, atomic writes, the model loader (timm_joint.io),
the denoiser protocol (timm_joint.protocol) and the results schema (timm_joint.results)."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_joint
from conftest import malicious_pickle
from timm_joint import evaluate, hub, io, protocol, results
from timm_joint.hub import save_pretrained
from timm_joint.io import atomic_dir, atomic_file, atomic_write, load_model, read_state_dict
from timm_joint.joint import PixelInput

ARCH = 'gradresnet_tiny_joint'


def _tiny(num_classes: int = 3):
    torch.manual_seed(0)
    return timm.create_model(ARCH, num_classes=num_classes, channels=(8, 16), layers=(1, 1)).eval()


def _tiny_args(num_classes: int = 3):
    return {'num_classes': num_classes, 'channels': [8, 16], 'layers': [1, 1]}


# -- the weights reader ------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['weights.safetensors', 'model.pth', 'pytorch_model.bin'])
def test_a_file_that_is_not_weights_gets_one_line_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_text('these are not weights\n' * 4)
    with pytest.raises(ValueError) as e:
        read_state_dict(path)
    message = str(e.value)
    assert '\n' not in message and name in message
    assert 'not a weights file' in message and 'expected a safetensors file' in message


def test_the_content_decides_not_the_name(tmp_path):
    tensors = {'a': torch.arange(3.), 'b.c': torch.ones(2, 2)}
    save_file(tensors, str(tmp_path / 'named.bin'))                     # safetensors under a .bin name
    torch.save({'state_dict': {f'module.{k}': v for k, v in tensors.items()}, 'epoch': 3},
               str(tmp_path / 'named.safetensors'))                     # a training checkpoint under that name
    for name in ('named.bin', 'named.safetensors'):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_pickles_that_run_code_are_refused_and_safetensors_only_refuses_all(tmp_path):
    sentinel = tmp_path / 'pwned'
    malicious_pickle(tmp_path / 'evil.pth', sentinel)
    with pytest.raises(ValueError, match='refused') as e:
        read_state_dict(tmp_path / 'evil.pth')
    assert '\n' not in str(e.value) and not sentinel.exists()
    torch.save({'w': torch.zeros(1)}, str(tmp_path / 'plain.pth'))
    assert set(read_state_dict(tmp_path / 'plain.pth')) == {'w'}
    with pytest.raises(ValueError, match='expected a safetensors file'):
        read_state_dict(tmp_path / 'plain.pth', torch_files=False)
    with pytest.raises(ValueError, match='no weights'):
        read_state_dict(tmp_path)  # a folder without model.safetensors or a PyTorch weights file
    with pytest.raises(ValueError, match='does not exist'):
        read_state_dict(tmp_path / 'nothing.safetensors')


def test_evaluate_reports_a_bad_weights_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / 'x.safetensors'
    bad.write_text('{"not": "weights"}\n')
    with pytest.raises(SystemExit) as e:
        evaluate.main(['--model', ARCH, '--checkpoint', str(bad), '--out', str(tmp_path / 'o'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(bad) in err[0] and 'expected a safetensors file' in err[0]


# -- atomic writes -----------------------------------------------------------------------------------

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'results.json'
    atomic_write(path, 'old')
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text('half')
            raise RuntimeError('killed')
    assert path.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['results.json']
    with pytest.raises(FileExistsError, match='--overwrite'):
        atomic_write(path, 'new', overwrite=False)
    assert path.read_text() == 'old'
    atomic_write(path, b'new')
    assert path.read_text() == 'new' and [p.name for p in tmp_path.iterdir()] == ['results.json']


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / 'export'
    with atomic_dir(final) as tmp:
        (tmp / 'a').write_text('1')
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / 'b').write_text('2')
            raise RuntimeError('killed')
    assert sorted(p.name for p in final.iterdir()) == ['a'] and [p.name for p in tmp_path.iterdir()] == ['export']
    with atomic_dir(final) as tmp:
        (tmp / 'b').write_text('2')
    assert sorted(p.name for p in final.iterdir()) == ['b'] and [p.name for p in tmp_path.iterdir()] == ['export']


# -- the one loader ----------------------------------------------------------------------------------

def test_one_loader_one_contract_for_every_source(tmp_path):
    net = _tiny()
    save_pretrained(net, tmp_path / 'export', model_name=ARCH, model_args=_tiny_args())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / 'weights.safetensors'))
    y = torch.rand(2, 3, 11, 9)
    sources = [(str(tmp_path / 'export'), None), (f'local-dir:{tmp_path / "export"}', None),
               (tmp_path / 'export', None), (ARCH, str(tmp_path / 'export'))]
    for name, checkpoint in sources:
        model, info = load_model(name, checkpoint)
        assert info['folder'] == str(tmp_path / 'export') and info['architecture'] == ARCH
        assert info['num_params'] == sum(p.numel() for p in net.parameters()) and not model.training
        torch.testing.assert_close(model.denoise(y), net.denoise(y), rtol=0, atol=0)
    # a state-dict file: the architecture comes from the name, the classes from the classifier's weights
    with pytest.raises(ValueError, match='does not fit'):
        load_model(ARCH, str(tmp_path / 'weights.safetensors'))  # the default channels are not these
    assert load_model is evaluate.load_model  # what restore and sample import


def test_a_foreign_classifier_gets_its_normalisation_inside(tmp_path):
    net = timm.create_model('test_resnet', num_classes=3).eval()
    save_pretrained(net, tmp_path / 'foreign', model_name='test_resnet', model_args={'num_classes': 3})
    model, _ = load_model(tmp_path / 'foreign')
    assert isinstance(model, PixelInput) and set(model.state_dict()) == {f'model.{k}' for k in net.state_dict()}
    assert tuple(model.pretrained_cfg['mean']) == (0., 0., 0.)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - model.mean) / model.std))
    # the wrapper normalises with the same code, and keeps its statistics in its exports
    wrapped = timm_joint.JointDensityWrapper(net, warn_untrained=False)
    assert isinstance(wrapped, PixelInput) and {'mean', 'std'} <= set(wrapped.state_dict())


def test_one_download_error_test():
    from timm_joint.models import gradresnet
    assert gradresnet.is_download_error is io.is_download_error
    assert io.is_download_error(ConnectionError()) and not io.is_download_error(ValueError('bad argument'))


# -- the denoiser protocol ---------------------------------------------------------------------------

def test_models_declare_the_protocol():
    net = _tiny()
    assert isinstance(net, protocol.Denoiser) and protocol.is_blind(net) and protocol.is_joint(net)
    headless = timm.create_model(ARCH, num_classes=0)
    assert protocol.has_energy(headless) and not protocol.has_classifier(headless) and not protocol.is_joint(headless)
    plain = timm.create_model('test_resnet', num_classes=3)
    assert not protocol.is_denoiser(plain) and protocol.has_classifier(plain) and not protocol.has_energy(plain)

    class Undeclared(torch.nn.Module):
        def denoise(self, y, *, sigma=None, c=None):
            assert sigma is not None, 'a denoiser that does not say it is blind is told sigma'
            return y

    y = torch.rand(1, 3, 8, 8)
    assert not protocol.is_blind(Undeclared()) and protocol.denoise_blind(Undeclared(), y, 0.1) is y
    torch.testing.assert_close(protocol.denoise_blind(net, y, 0.1), net.denoise(y), rtol=0, atol=0)


def test_dedicated_denoisers_declare_whether_they_are_blind():
    pytest.importorskip('deepinv')
    dncnn = timm.create_model('dncnn_deepinv', depth=3, width=8)
    drunet = timm.create_model('drunet_deepinv', width=4, num_blocks=1)
    assert protocol.is_blind(dncnn) and not protocol.is_blind(drunet)
    assert isinstance(drunet, protocol.Denoiser) and not protocol.has_classifier(drunet)


# -- the results schema ------------------------------------------------------------------------------

def test_one_results_validator_for_the_writer_and_the_card():
    assert hub.NA is evaluate.NA is results.NA and evaluate.validate_results is results.validate_results
    card = {'schema_version': 1, 'model': {'name': ARCH}, 'dataset': {'name': '', 'split': 'val', 'num_images': 4},
            'accuracy': {'0': 50.}, 'psnr': {'blind': {'25': 30.}}}
    hub.validate_results(card)  # what a card needs
    with pytest.raises(ValueError, match="missing key 'model.checkpoint'"):
        results.validate_results(card)  # the evaluation writes more, and checks that it did
    # a key means the same to both: canonical noise levels, and 0 refused where a PSNR is undefined
    for bad, match in (({'accuracy': {'25.0': 50.}}, 'noise level'), ({'psnr': {'blind': {'0': 30.}}}, 'undefined'),
                       ({'ece': {'0': 'n/a'}}, "'ece.0'")):
        with pytest.raises(ValueError, match=match):
            hub.validate_results(dict(card, **bad))


def test_load_results_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        results.load_results(tmp_path / 'results.json')
    (tmp_path / 'results.json').write_text('{')
    with pytest.raises(ValueError, match='not valid JSON'):
        hub.load_results(tmp_path / 'results.json')
    (tmp_path / 'results.json').write_text(json.dumps([1]))
    with pytest.raises(ValueError, match='JSON object'):
        results.load_results(tmp_path / 'results.json')
