"""The denoising loader's patch schedule across a resume: a fresh process that resumes into a new stage
reads the same batches as the run that never stopped."""
import copy

import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_joint import data as data_module
from timm_joint.training import DenoisingLoader, DenoisingStage, TrainState


def _make_loader(dataset, batch_size):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _take(loader, n):
    return [next(loader)[0].tolist() for _ in range(n)]


def test_resume_into_a_new_stage_reads_what_the_uninterrupted_run_reads(monkeypatch):
    monkeypatch.setattr(data_module, 'set_denoising_patch', lambda *a, **k: None)
    dataset = TensorDataset(torch.arange(40))
    stages = [DenoisingStage(epoch=0, patch_size=8, batch_size=2), DenoisingStage(epoch=1, patch_size=16, batch_size=3)]

    state = TrainState()
    run = DenoisingLoader(dataset, stages, state, _make_loader, hflip=0.)
    run.set_epoch(0)
    _take(run, 5)                          # stage 0 stops mid-pass: den_step 5
    saved = copy.deepcopy(state.state_dict())
    run.set_epoch(1)
    uninterrupted = _take(run, 4)

    resumed_state = TrainState()
    resumed_state.load_state_dict(saved)   # a new process, from the checkpoint written at the end of epoch 0
    resumed = DenoisingLoader(dataset, stages, resumed_state, _make_loader, hflip=0.)
    resumed.set_epoch(1)
    assert _take(resumed, 4) == uninterrupted
    assert uninterrupted[0] == [0, 1, 2]   # the new stage starts its own pass
    assert resumed_state.state_dict() == state.state_dict()


def test_resume_inside_a_stage_continues_its_pass(monkeypatch):
    monkeypatch.setattr(data_module, 'set_denoising_patch', lambda *a, **k: None)
    dataset = TensorDataset(torch.arange(40))
    stages = [DenoisingStage(epoch=0, patch_size=8, batch_size=2)]
    state = TrainState()
    run = DenoisingLoader(dataset, stages, state, _make_loader, hflip=0.)
    run.set_epoch(0)
    _take(run, 5)
    saved = copy.deepcopy(state.state_dict())
    rest = _take(run, 3)

    resumed_state = TrainState()
    resumed_state.load_state_dict(saved)
    resumed = DenoisingLoader(dataset, stages, resumed_state, _make_loader, hflip=0.)
    resumed.set_epoch(0)
    assert _take(resumed, 3) == rest == [[10, 11], [12, 13], [14, 15]]
