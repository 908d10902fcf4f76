"""The images of an image-folder run: which split folders it reads, and what happens to an image that cannot
be read.

timm's dataset reads `<root>/<split>/`, a synonym of the split (`val/` for `validation`), or, when neither
exists, the root itself, so a missing `validation/` silently validates on the training images. Here each
split must name a folder that exists (`.` names the root on purpose), both splits must hold the same
classes, and a damaged image is skipped by timm's own retry loop with its path in the warning.

    folder = split_folder('/data', 'validation', '--val-split')     # '/data/validation', or ConfigError
    name_unreadable_images(dataset)                                 # skips name the file; see check_first_images
"""
import os
from typing import Any, Dict, List, Optional, Sequence

from PIL import Image
from timm.data import ImageDataset
from timm.data.dataset_factory import _search_split
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.data.readers.reader_image_in_tar import ReaderImageInTar

from .errors import ConfigError, UnreadableImagesError

ROOT_SPLIT = '.'  # --train-split . / --val-split . : read the dataset root itself, on purpose
_SHOWN = 5  # names listed in a message before "and N more"


def _listed(names: Sequence[str]) -> str:
    """'a, b, c' with at most _SHOWN names, then 'and N more'."""
    shown = ', '.join(names[:_SHOWN])
    return shown + (f' and {len(names) - _SHOWN} more' if len(names) > _SHOWN else '')


def split_folder(root: str, split: str, flag: str, other_split: str = '') -> str:
    """The folder timm's dataset reads `split` from, refusing timm's silent fallback to the root.

    Args:
        root: the dataset root folder.
        split: the split name as the flag gives it ('train', 'validation[:50%]', or '.' for the root).
        flag: the flag that named the split, for the message ('--train-split' or '--val-split').
        other_split: the other split's name, left out of the folders the message suggests.

    Returns:
        `root/<split>`, or the synonym folder timm picks (`val/` for 'validation'), or `root/.` for '.'.

    Raises:
        ConfigError: no folder of that name (or a synonym) in `root`, naming the folders there and the flag.
    """
    name = split.split('[')[0]
    folder = _search_split(root, split)
    if name == ROOT_SPLIT or os.path.normpath(folder) != os.path.normpath(root):
        return folder
    subfolders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    holds = f'it holds {_listed([f"{n}/" for n in subfolders])}' if subfolders else 'it holds no folders'
    choices = [n for n in subfolders if n != other_split.split('[')[0]]
    fixes = [f'{flag} {choices[0]} to read {choices[0]}/'] if choices else []
    fixes.append(f'{flag} {ROOT_SPLIT} to read {root} itself')
    if flag == '--val-split':
        fixes.append("--val-split '' to train without validation")
    raise ConfigError(f"{flag} {split}: there is no {name}/ folder in {root} ({holds}), and timm would read all of "
                      f"{root} in its place; pass {', or '.join(fixes)}")


def holds_images(folder: str) -> bool:
    """Whether any file below `folder` has an image extension timm's folder reader reads (stops at the first)."""
    extensions = set(get_img_extensions())
    return any(os.path.splitext(name)[1].lower() in extensions for _, _, files in os.walk(folder) for name in files)


def check_same_classes(class_to_idx: Dict[str, int], other: Dict[str, int], folder: str, other_folder: str) -> None:
    """Two splits must number the same classes the same way, or the second split's labels are wrong.

    Raises:
        ConfigError: naming the classes found in only one of the splits (or the first class numbered apart).
    """
    if class_to_idx == other:
        return
    only, only_other = sorted(set(class_to_idx) - set(other)), sorted(set(other) - set(class_to_idx))
    parts = [f'only in {folder}: {_listed(only)}'] if only else []
    parts += [f'only in {other_folder}: {_listed(only_other)}'] if only_other else []
    if not parts:
        first = next(c for c in class_to_idx if class_to_idx[c] != other[c])
        parts = [f"'{first}' is class {class_to_idx[first]} in one and {other[first]} in the other"]
    raise ConfigError(f'the splits hold different classes ({"; ".join(parts)}), so each would number its classes '
                      f'its own way and the labels of {other_folder} would be wrong; give both splits the same class '
                      f'folders, or one --class-map for both')


def read_image(file: Any, path: str, mode: Optional[str]) -> Image.Image:
    """Decode one image file object (converted to `mode` when given) as timm's ImageDataset would, and close it.

    Raises:
        OSError: the file is not a readable image, with its path in the message.
    """
    with file:
        try:
            image = Image.open(file)
            image.load()
            return image.convert(mode) if mode else image
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError or its DecompressionBombError
            raise OSError(f'cannot read image {path} ({type(e).__name__}: {e})') from e


class DecodedSample:
    """An image the reader already decoded, handed through ImageDataset with `load_bytes` (which `.read()`s it)."""

    def __init__(self, image: Image.Image):
        self.image = image

    def read(self) -> Image.Image:
        return self.image


class NamedImageReader(Reader):
    """A timm folder or tar reader whose samples arrive decoded, so an unreadable image is skipped by name.

    timm's ImageDataset decodes where it no longer knows the file: its warning for a damaged image names an
    index. Here the reader decodes (once: the dataset is set to `load_bytes`, and takes the decoded image as
    it is) and raises an OSError naming the path, which timm's retry loop logs and skips. After `max_in_a_row`
    unreadable images in a row it raises UnreadableImagesError instead, which ends the run in one line.

    Args:
        reader: the dataset's own reader (ReaderImageFolder or ReaderImageInTar).
        mode: PIL mode the images are converted to (the dataset's input_img_mode), or None.
        max_in_a_row: unreadable images in a row that stop the run (timm's own limit).
    """

    def __init__(self, reader: Reader, mode: Optional[str], max_in_a_row: int):
        super().__init__()
        self.reader = reader
        self.mode = mode
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0  # per process: each loader worker has its own copy

    def __getitem__(self, index: int):
        file, target, *features = self.reader[index]
        try:
            image = read_image(file, self.reader.filename(index, absolute=True), self.mode)
        except OSError:
            self.in_a_row += 1
            if self.in_a_row >= self.max_in_a_row:
                raise UnreadableImagesError() from None
            raise
        self.in_a_row = 0
        return (DecodedSample(image), target, *features)

    def __len__(self) -> int:
        return len(self.reader)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return self.reader.filename(index, basename=basename, absolute=absolute)

    def __getattr__(self, name: str):  # class_to_idx, samples, root of the wrapped reader
        if name == 'reader':  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.reader, name)


def name_unreadable_images(dataset: Any) -> bool:
    """Make a timm folder / tar ImageDataset name the files it skips (see NamedImageReader); True if it was one."""
    if not isinstance(dataset, ImageDataset) or dataset.load_bytes or \
            not isinstance(dataset.reader, (ReaderImageFolder, ReaderImageInTar)):
        return False
    dataset.reader = NamedImageReader(dataset.reader, dataset.input_img_mode, dataset._max_retries)
    dataset.load_bytes = True  # the reader hands over decoded images
    return True


def check_first_images(dataset: Any, folder: str) -> None:
    """Before training: the split must not begin with as many unreadable images as stop a run.

    Reads images in order until one decodes (one read for a healthy split).

    Raises:
        ConfigError: naming a few of the unreadable files, when none of the first ones can be read.
    """
    reader = getattr(dataset, 'reader', None)
    if not isinstance(reader, NamedImageReader) or len(reader) == 0:
        return
    problems: List[str] = []
    for index in range(min(reader.max_in_a_row, len(reader))):
        path = reader.filename(index, absolute=True)
        try:
            read_image(reader.reader[index][0], path, reader.mode)
            return
        except OSError as e:
            problems.append(f'{path} ({e.__cause__})')
    raise ConfigError(f'{folder}: none of its first {len(problems)} images can be read, e.g. {_listed(problems[:3])}; '
                      f'the split looks damaged: replace the files (or point the split at intact copies)')
