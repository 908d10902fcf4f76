"""Shared fixtures: small generated ImageFolder datasets (train/ and validation/ splits) in tmp dirs, and a Hub
that no test reaches; and `load_benchmark` for the tests of benchmarks/ scripts."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import huggingface_hub
import numpy as np
import pytest
import torch.distributed as dist
from PIL import Image


def write_image_folder(
        root: Path,
        num_classes: int = 3,
        size: int = 32,
        images_per_class: int = 8,
        splits: Sequence[str] = ('train', 'validation'),
        seed: int = 0,
) -> Path:
    """Write `root/<split>/class_<i>/<n>.png` images whose content depends on the class.

    Class i gets a bright square at its own position and a tint of channel i % 3 over low noise, so a
    tiny model can tell the classes apart in a few steps. Returns `root`.
    """
    rng = np.random.default_rng(seed)
    cell = max(size // 4, 1)
    for split in splits:
        for cls in range(num_classes):
            folder = root / split / f'class_{cls}'
            folder.mkdir(parents=True, exist_ok=True)
            row, col = divmod(cls % 16, 4)
            for n in range(images_per_class):
                pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)  # H, W, C
                pixels[..., cls % 3] += 90
                pixels[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = 250
                Image.fromarray(pixels).save(folder / f'{n}.png')
    return root


def load_benchmark(name: str) -> ModuleType:
    """The script benchmarks/<name>.py as a module (benchmarks/ is no package; its scripts import each other)."""
    benchmarks = str(Path(__file__).resolve().parents[1] / 'benchmarks')
    sys.path.insert(0, benchmarks)
    try:
        spec = importlib.util.spec_from_file_location(name, f'{benchmarks}/{name}.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(benchmarks)


@pytest.fixture
def image_folder_factory(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `image_folder_factory(num_classes=3, size=32, images_per_class=8, splits=..., name='data')`."""
    def make(name: str = 'data', **kwargs) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)
    return make


@pytest.fixture
def image_folder(image_folder_factory) -> Path:
    """A 3-class, 32x32 ImageFolder tree with 8 images per class in train/ and validation/; returns its root."""
    return image_folder_factory()


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test reaches the Hugging Face Hub: the token check (HfApi.whoami) answers as on a machine without
    network. Tests that need another answer replace it at the same boundary."""
    def whoami(api, *args, **kwargs):
        raise ConnectionError('no network in the test suite')
    monkeypatch.setattr(huggingface_hub.HfApi, 'whoami', whoami)


@pytest.fixture
def process_group(tmp_path):
    """A one-rank gloo process group, for DDP in the test's own process."""
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    yield
    dist.destroy_process_group()
