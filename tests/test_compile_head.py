"""compile_head: DRLoc heads compiled alone train like eager ones for the same seed, compile once per
kind of shape (not per step), and keep working under autocast, EMA, DDP and a whole-model compile."""
import logging
import os
from typing import List, Optional

import pytest
import timm
import torch
import torch._inductor.config
import torch.distributed as dist
import torch.nn as nn

import timm_drloc.train as train
from timm_drloc.train import build
from timm_drloc import DRLocHead, DRLocTask


# mutmut's trampoline (MUTANT_UNDER_TEST set) sets a ContextVar in every mutated function, which dynamo cannot
# trace: under mutation testing a whole graph, or a set number of compiles, cannot be asked for
traceable_only = pytest.mark.skipif('MUTANT_UNDER_TEST' in os.environ,
                                    reason='mutation testing: mutated functions break the graph')


def make_task(**kwargs) -> DRLocTask:
    """A 1-block ViT on 32 px inputs (a 4x4 grid: fewer cells than the 64 pairs) with DRLoc, seeded."""
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=32,
                              num_heads=2, num_classes=4)
    return DRLocTask(model, hidden_dim=16, verbose=False, **kwargs)


def batch():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])


def drloc_losses(task: DRLocTask, steps: int = 2, amp: Optional[torch.dtype] = None) -> List[float]:
    """DRLoc loss of each of `steps` AdamW steps on one batch (the pairs drawn after seeding 1), under
    autocast to `amp` if given."""
    task.train()
    optimizer = torch.optim.AdamW(task.get_trainable_module().parameters(), lr=1e-2)
    images, labels = batch()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast('cpu', dtype=amp or torch.bfloat16, enabled=amp is not None):
            result = task(images, labels)
        result['loss'].backward()
        optimizer.step()
        losses.append(result['drloc_loss'].item())
    return losses


@pytest.mark.parametrize('amp', [None, torch.bfloat16, torch.float16], ids=['fp32', 'bf16-autocast', 'fp16-autocast'])
def test_compiled_heads_train_like_eager_heads_for_the_same_seed(amp):
    torch._dynamo.reset()
    eager = drloc_losses(make_task(), amp=amp)
    compiled = drloc_losses(make_task(compile_head=True), amp=amp)
    # autocast: the compiled head's 2-wide last layer is a float32 multiply-and-sum, the eager one a 16-bit matmul
    torch.testing.assert_close(compiled, eager, rtol=1e-4 if amp is None else 2e-2, atol=1e-5)


def test_whole_model_compile_gives_the_eager_losses_for_the_same_seed():
    # inductor draws its own random numbers unless told to use torch's (fallback_random): then the pairs match
    torch._dynamo.reset()
    eager = drloc_losses(make_task())
    task = make_task(compile_head=True)  # inside a whole-model compile the heads are traced with the model
    task.compile()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = drloc_losses(task)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@traceable_only
def test_compiled_head_compiles_once_per_kind_of_shape_and_reports_it_once(caplog):
    torch._dynamo.reset()
    head = DRLocHead(16, (8, 8), hidden_dim=16, compiled=True)

    def step(batch_size: int, height: int, width: int) -> None:
        head(torch.randn(batch_size, height, width, 16, requires_grad=True)).backward()

    with caplog.at_level(logging.INFO, logger='timm_drloc.head'):
        step(2, 4, 5)
        step(3, 5, 6)  # a second compile, which makes batch and grid sizes dynamic
        with torch._dynamo.config.patch(error_on_recompile=True):
            for size in [(4, 6, 7), (5, 3, 4), (2, 4, 5), (3, 7, 8)]:
                step(*size)
    assert sum('first compiled call took' in r.getMessage() for r in caplog.records) == 1


@traceable_only
def test_compiled_head_traces_into_an_enclosing_compile_without_graph_breaks():
    head = DRLocHead(16, (4, 5), hidden_dim=16, compiled=True)
    outer = torch.compile(head, backend='eager', fullgraph=True)  # fullgraph: a graph break would raise
    grid = torch.randn(2, 4, 5, 16, requires_grad=True)
    outer(grid).backward()
    assert grid.grad.abs().sum() > 0


@traceable_only
def test_whole_drloc_model_compiles_into_one_graph():
    drloc = make_task(compile_head=True).get_trainable_module()
    drloc.train()
    compiled = torch.compile(drloc, backend='eager', fullgraph=True)  # fullgraph: a graph break would raise
    logits, loss = compiled(batch()[0])
    assert logits.shape == (4, 4) and torch.isfinite(loss)


def test_ema_copy_of_compiled_heads_computes_with_its_own_weights():
    task = make_task(compile_head=True)
    task.setup_ema(decay=0.5)
    ema = task.get_trainable_module(ema=True).module
    ema.train()
    with torch.no_grad():
        ema.heads[0].mlp[4].bias.add_(100.)  # moves only the EMA head's predicted offsets
    images, _ = batch()
    torch.manual_seed(2)
    _, loss = task.get_trainable_module()(images)
    torch.manual_seed(2)
    _, ema_loss = ema(images)
    assert ema_loss > loss + 50


def test_compiled_heads_under_ddp_get_the_gradients_of_eager_heads(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        grads = []
        for compile_head in (False, True):
            task = make_task(compile_head=compile_head).prepare_distributed()
            task.train()
            images, labels = batch()
            task(images, labels)['loss'].backward()
            grads.append([p.grad for p in task.trainable_module.module.heads.parameters()])
    finally:
        dist.destroy_process_group()
    assert all(g is not None for g in grads[1])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_drloc_compile_head_flag_builds_compiled_heads(monkeypatch):
    monkeypatch.setattr('sys.argv', ['train_drloc.py', '--data-dir', '/data', '--drloc-lambda', '0.5',
                                     '--drloc-hidden-dim', '16', '--drloc-compile-head'])
    args = train._parse_args()[0]
    args.rank = 0  # main() sets it from the distributed set-up
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    task = build.build_task(args, model, nn.CrossEntropyLoss(), (3, 32, 32), torch.device('cpu'), None)
    assert [head.compiled for head in task.get_trainable_module().heads] == [True]


def test_unknown_compile_mode_is_refused_with_the_value():
    with pytest.raises(ValueError, match="compile_head must be True, False or a torch.compile mode .*got 'fast'"):
        DRLocHead(8, (4, 4), compiled='fast')
