"""Data sets by name, and loaders that shard across ranks.

    train, test, info = data.get_dataset("auto")          # staged CIFAR-10, else synthetic
    data.plot_examples(train, info.classes)               # a few images of each class, named
    loader = data.make_loader(train, batch_size=64, env=env, shuffle=True)
    x = data.augment_batch(images)                        # uint8 (B, 3, H, W) cropped and flipped on their device

Names:
- `synthetic`: CIFAR-shaped (3x32x32 uint8), deterministic from a seed, 10 classes a person tells
  apart at a glance (SYNTHETIC_CLASSES: a disc, a ring, a square, a diamond, ...), each shape at a
  random place, size, small turn and colour within its class's colour family, on a background with
  clutter and noise; a small CNN climbs well above chance in a few CPU epochs, not in one.
- `cifar10`: the real set from a staged folder ($WORKSHOP_DATA/cifar-10-batches-py), staged by
  `scripts/stage_data.sh` on a machine with internet. Nothing is downloaded here.
- `imagefolder`: your own images, one folder per class ($WORKSHOP_DATA/<name>/{train,test}/<class>/
  or a path given with `root=`), resized to `image_size`.
- `auto`: `cifar10` where it is staged, else `synthetic`; it says which it took.

Token data for the language model (TinyGPT, notebooks 06 to 10), bytes as tokens (vocabulary 256):

    train, test, info = data.get_text_dataset("synthetic", seq_len=128)
    data.decode(data.encode("hello"))                     # 'hello'

- `synthetic`: English-like sentences from a small grammar, deterministic from a seed. Words,
  spelling and agreement ("the dogs run", "a dog runs") are there to learn: a 1M-parameter model
  gets far below the uniform baseline (ln 256 = 5.55 nats) in a minute on CPU.
- a path to a UTF-8 text file (or `$WORKSHOP_DATA/<name>.txt`): your own text, split 90/10.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from workshop.base.runs import display_path
from workshop.dist import DistEnv, print0

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
PAD = 4  # pixels of padding for the random crop, as in the usual CIFAR-10 recipe (He et al. 2016, section 4.2)
STAGE_HINT = (
    "stage it on a machine with internet (a login node): `scripts/stage_data.sh cifar10 DIR`, "
    "then `export WORKSHOP_DATA=DIR` (or pass dataset='synthetic' to run without it)"
)


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    source: str  # where it came from, for the record
    classes: tuple[str, ...] = ()  # the class names, by label


def data_root() -> Path:
    """$WORKSHOP_DATA, else data/ at the top of the repository."""
    default = Path(__file__).resolve().parent.parent / "data"
    return Path(os.environ.get("WORKSHOP_DATA", default)).expanduser()


# The synthetic classes: five shapes, each in two orientations or variants. Classes 2k and 2k+1 share a colour family
# (_FAMILY_HUES[k]), so colour narrows a class down to a pair and only the shape's form or orientation decides.
SYNTHETIC_CLASSES = ("disc", "ring", "square", "diamond", "triangle up", "triangle down", "plus", "x",
                     "horizontal bars", "vertical bars")
_SHAPES = ("disc", "ring", "square", "square", "triangle", "triangle", "plus", "plus", "bars", "bars")
_ANGLES = (0.0, 0.0, 0.0, math.pi / 4, 0.0, math.pi, 0.0, math.pi / 4, 0.0, math.pi / 2)  # a diamond is a turned square
_FAMILY_HUES = (0.0, 0.14, 0.33, 0.58, 0.78)  # red, yellow, green, blue, purple
_CHUNK = 1024  # images drawn at once: the (chunk, 3, 32, 32) float intermediates stay in the CPU's caches


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hue, saturation and value, each (n,) in [0, 1] -> RGB colours (n, 3, 1, 1)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6  # (n, 3)
    return (v[:, None] - v[:, None] * s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))[:, :, None, None]


def _shape_extent(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A function of a shape's own coordinates (u to the right, v down, in units of its radius; (n, H, W) each) that
    is at most 1 inside the shape and grows like the distance from its edge outside it: (1 - f) * radius is about
    the number of pixels a point lies inside, which gives edges one pixel of anti-aliasing."""
    if shape == "disc":
        return torch.sqrt(u * u + v * v)
    if shape == "ring":  # a band 0.6 radii wide around the circle of radius 0.68
        return (torch.sqrt(u * u + v * v) - 0.68).abs() + 0.7
    if shape == "square":  # half side 0.75
        return torch.maximum(u.abs(), v.abs()) + 0.25
    if shape == "triangle":  # equilateral, apex up, inscribed circle of radius 0.5: the nearest of its three sides
        s = math.sqrt(3) / 2
        return torch.maximum(torch.maximum(v, s * u - 0.5 * v), -s * u - 0.5 * v) + 0.5
    if shape == "plus":  # two bars 0.56 radii wide
        return torch.minimum(torch.maximum(u.abs() + 0.72, v.abs()), torch.maximum(v.abs() + 0.72, u.abs()))
    if shape == "bars":  # three horizontal bars, 0.34 radii thick, in a square window
        gap = (v - 0.66 * torch.round(v / 0.66)).abs()
        return torch.maximum(torch.maximum(u.abs(), v.abs()) + 0.15, gap + 0.83)
    raise ValueError(f"unknown shape {shape!r}")


def _draw(labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """uint8 images (n, 3, size, size) of the classes `labels`, every random choice from `g`."""
    n = len(labels)

    def uniform(lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(n, generator=g)  # (n,)

    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # pixel centres (H, W)
    # Background: two muted colours blended along a random direction.
    c0 = _hsv_to_rgb(uniform(), uniform(0, 0.5), uniform(0.15, 0.85))
    c1 = _hsv_to_rgb(uniform(), uniform(0, 0.5), uniform(0.15, 0.85))
    a = uniform(0, 2 * math.pi)[:, None, None]
    t = (((xs - size / 2) * torch.cos(a) + (ys - size / 2) * torch.sin(a)) / size + 0.5).clamp(0, 1)  # (n, H, W)
    img = c0 + (c1 - c0) * t[:, None]  # (n, 3, H, W)
    # Clutter: four short strokes in any colour, so that "a patch of colour" is not the object.
    for _ in range(4):
        colour = _hsv_to_rgb(uniform(), uniform(0.3, 1), uniform(0.3, 1))
        cy, cx, angle = uniform(0, size)[:, None, None], uniform(0, size)[:, None, None], uniform(0, math.pi)[:, None, None]
        half_length, width = uniform(1, 6)[:, None, None], uniform(0.7, 1.6)[:, None, None]
        along = (xs - cx) * torch.cos(angle) + (ys - cy) * torch.sin(angle)
        across = (ys - cy) * torch.cos(angle) - (xs - cx) * torch.sin(angle)
        dist = torch.sqrt((along.abs() - half_length).clamp(min=0) ** 2 + across ** 2)  # pixels from the stroke
        img = img + (colour - img) * (0.5 + width - dist).clamp(0, 1)[:, None]
    # The object: its class's shape and orientation, turned by up to 15 degrees, 7 to 11.5 pixels in radius, anywhere
    # in the image, in its family's hue (+-0.05) at a random saturation and brightness.
    hue = (torch.tensor(_FAMILY_HUES)[labels // 2] + uniform(-0.05, 0.05)) % 1
    colour = _hsv_to_rgb(hue, uniform(0.55, 1), uniform(0.65, 1))
    radius = uniform(7, 11.5)
    cy, cx = uniform() * (size - 1.6 * radius) + 0.8 * radius, uniform() * (size - 1.6 * radius) + 0.8 * radius
    angle = torch.tensor(_ANGLES)[labels] + uniform(-math.pi / 12, math.pi / 12)
    cos, sin, r = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None], radius[:, None, None]
    dx, dy = (xs - cx[:, None, None]) / r, (ys - cy[:, None, None]) / r
    u, v = dx * cos + dy * sin, dy * cos - dx * sin  # the shape's own coordinates (n, H, W)
    cover = torch.zeros(n, size, size)
    for k, shape in enumerate(_SHAPES):
        mine = labels == k
        cover[mine] = (0.5 + (1 - _shape_extent(shape, u[mine], v[mine])) * r[mine]).clamp(0, 1)
    img = img + (colour - img) * cover[:, None]
    img = img + 0.06 * torch.randn(img.shape, generator=g)  # sensor-like noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def make_synthetic(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` CIFAR-shaped images of the SYNTHETIC_CLASSES and their labels, a pure function of (n, seed, size).

    Every image shows one shape of its class on a background of two blended colours with four strokes of clutter;
    position, size, a turn of up to 15 degrees, the colour within its family and the pixel noise are random. A person
    tells the classes apart at a glance; a small CNN needs a few epochs (notebook 01 prints its accuracy).
    Returns (images uint8 [n, 3, size, size], labels int64 [n]).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SYNTHETIC_CLASSES), (n,), generator=g)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    # One thread: these many small elementwise operations lose more to waking a thread pool than they gain, and
    # on a busy shared machine the pool's waits made drawing 4096 images 5-10x slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, n, _CHUNK):
            images[start:start + _CHUNK] = _draw(labels[start:start + _CHUNK], size, g)
    finally:
        torch.set_num_threads(threads)
    return images, labels


class ImageTensors(Dataset):
    """uint8 images in memory, returned normalised as float (3, H, W), with optional flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255).sub_(self.mean).div_(self.std)
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def augment_draws(batch_size: int, pad: int = PAD, device="cpu", generator: torch.Generator | None = None):
    """The random choices of `augment_batch`, in its order: crop offsets dy, dx (B,) in [0, 2 pad] into the padded
    image, and a flip (B,) bool per image. Drawn again from a generator seeded alike, they say what it did."""
    dy = torch.randint(0, 2 * pad + 1, (batch_size,), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch_size,), device=device, generator=generator)
    flip = torch.rand(batch_size, device=device, generator=generator) < 0.5
    return dy, dx, flip


def augment_batch(images: torch.Tensor, pad: int = PAD, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> normalised float (B, 3, H, W), randomly cropped from the image padded by
    `pad` pixels (reflect) and flipped left-right with probability 1/2: a batch at once, on the images' device."""
    B, C, H, W = images.shape
    dev = images.device
    mean = torch.tensor(CIFAR_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=dev).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, 3, H + 2 pad, W + 2 pad)
    dy, dx, flip = augment_draws(B, pad, dev, generator)  # crop offsets and a flip, one per image
    rows = (dy[:, None] + torch.arange(H, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    x = x[torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, 3, H, W)


class AugmentedImages(ImageTensors):
    """A DataLoader's data set: the augmentation of `augment_batch`, one image at a time (a slice of the padded
    image, as torchvision's RandomCrop does), in the process that loads it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pad: int = PAD):
        super().__init__(images, labels)
        self.pad = pad

    def __getitem__(self, i):
        x, label = super().__getitem__(i)  # normalised (3, H, W)
        _, H, W = x.shape
        x = F.pad(x[None], (self.pad,) * 4, mode="reflect")[0]  # (3, H + 2 pad, W + 2 pad)
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = x[:, dy:dy + H, dx:dx + W]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), label


def plot_examples(dataset: Dataset, classes, per_class: int = 4, seed: int = 0):
    """A figure of `per_class` images of each class, one column per class under its name: what the model is asked
    to tell apart. Images as the data set returns them (normalised float, un-normalised here for display)."""
    import textwrap

    from matplotlib.figure import Figure  # no pyplot: the figure is returned, not shown twice

    labels = torch.as_tensor(getattr(dataset, "labels", None) if hasattr(dataset, "labels") else dataset.targets)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    fig = Figure(figsize=(1.0 * len(classes), 1.0 * per_class + 0.5), dpi=72, layout="constrained")
    axes = fig.subplots(per_class, len(classes), squeeze=False)
    for c, name in enumerate(classes):
        picks = order[labels[order] == c][:per_class].tolist()
        for row in range(per_class):
            ax = axes[row, c]
            ax.axis("off")
            if row < len(picks):
                x = dataset[picks[row]][0] * std + mean  # (3, H, W) in [0, 1]
                ax.imshow(x.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[0, c].set_title("\n".join(textwrap.wrap(str(name), 10)), fontsize=9)
    return fig


def check_cifar10(root: Path | None = None) -> Path:
    """The staged CIFAR-10 folder, after checking every file is there and whole (MD5 sums as
    published with the set); FileNotFoundError saying how to stage it otherwise."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    root = Path(root) if root is not None else data_root()
    folder = root / CIFAR10.base_folder
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 is not staged: {display_path(folder)} does not exist; {STAGE_HINT}")
    bad = [name for name, md5 in CIFAR10.train_list + CIFAR10.test_list if not check_integrity(str(folder / name), md5)]
    if bad:
        raise FileNotFoundError(f"CIFAR-10 in {display_path(folder)} is incomplete or corrupt ({', '.join(bad)} missing or "
                                f"with a wrong checksum): delete the folder and stage it again; {STAGE_HINT}")
    return folder


def _cifar10(root: Path, augment: bool):
    import torchvision

    folder = check_cifar10(root)
    sets = []
    for train in (True, False):
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        sets.append(ImageTensors(images, torch.tensor(ds.targets), augment=augment and train))
    return sets[0], sets[1], DataInfo("cifar10", 10, (3, 32, 32), len(sets[0]), len(sets[1]), str(folder), tuple(ds.classes))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # what ImageFolder reads


def check_image_folder(root: Path) -> Path:
    """Raise, saying what to fix, unless `root` holds train/<class>/ folders of images: at least two
    classes (a classifier of one class learns nothing), none of them empty. Returns `root`."""
    root = Path(root)
    layout = f"lay it out as {display_path(root)}/train/<class>/*.jpg and {display_path(root)}/test/<class>/*.jpg"
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"no image folder at {display_path(root)}/train: {layout}")
    classes = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        found = f"one class ({classes[0].name})" if classes else "no class folder"
        raise ValueError(f"the image folder {display_path(root)}/train has {found}: a classifier needs at least two; {layout}")
    empty = [c.name for c in classes if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in c.rglob("*"))]
    if empty:
        raise ValueError(f"the image folder {display_path(root)}/train has class folders without images: "
                         f"{', '.join(empty)} (images are {', '.join(IMAGE_SUFFIXES)}); add images or remove the folders")
    return root


def _imagefolder(root: Path, image_size: int, augment: bool):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    check_image_folder(root)
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    base = [T.Resize((image_size, image_size)), T.ToTensor(), norm]
    train_tf = T.Compose(([T.RandomHorizontalFlip()] if augment else []) + base)
    train = ImageFolder(str(root / "train"), transform=train_tf)
    test_dir = root / "test" if (root / "test").is_dir() else root / "train"
    test = ImageFolder(str(test_dir), transform=T.Compose(base))
    info = DataInfo("imagefolder", len(train.classes), (3, image_size, image_size), len(train), len(test), str(root),
                    tuple(train.classes))
    return train, test, info


def get_dataset(
    name: str = "auto",
    *,
    num_train: int = 50_000,
    num_test: int = 10_000,
    seed: int = 0,
    augment: bool = False,
    root: str | os.PathLike | None = None,
    image_size: int = 32,
) -> tuple[Dataset, Dataset, DataInfo]:
    """(train, test, info) for a data set name (see the module docstring).

    `num_train`/`num_test` size the synthetic set; `root` overrides $WORKSHOP_DATA.
    """
    base = Path(root).expanduser() if root is not None else data_root()
    if name == "auto":
        if (base / "cifar-10-batches-py").is_dir():
            name = "cifar10"
        else:
            print0(f"data: CIFAR-10 is not staged in {display_path(base)}/ ($WORKSHOP_DATA), using the synthetic set")
            name = "synthetic"
    if name == "synthetic":
        train = ImageTensors(*make_synthetic(num_train, seed=seed), augment=augment)
        test = ImageTensors(*make_synthetic(num_test, seed=seed + 1_000_003))
        return train, test, DataInfo("synthetic", len(SYNTHETIC_CLASSES), (3, 32, 32), num_train, num_test,
                                     f"synthetic(seed={seed})", SYNTHETIC_CLASSES)
    if name == "cifar10":
        return _cifar10(base, augment)
    if name == "imagefolder":
        return _imagefolder(base, image_size, augment)
    if (base / name / "train").is_dir():  # a named image folder under $WORKSHOP_DATA
        return _imagefolder(base / name, image_size, augment)
    raise ValueError(
        f"unknown data set {name!r}: use 'auto', 'synthetic', 'cifar10', 'imagefolder', or the name "
        f"of a folder under {base} laid out as <name>/train/<class>/"
    )


def load_images(dataset: str, num_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """uint8 images (N, 3, 32, 32), labels (N,) and the data set's name: `num_samples` synthetic ones, or a
    staged CIFAR-10 (all of it) for "cifar10", or "auto" (CIFAR-10 where staged)."""
    train, _, info = get_dataset(dataset, num_train=num_samples, num_test=1, seed=seed)
    if not isinstance(train, ImageTensors):
        raise ValueError(f"data set {dataset!r}: the images must be held in memory (synthetic or cifar10)")
    return train.images, train.labels, info.name


# A small grammar: sentences with agreement between subject and verb, so the next byte depends
# on more than the previous few.
_ADJECTIVES = ["old", "young", "quiet", "clever", "tired", "brave", "small", "green", "heavy", "bright"]
_NOUNS = [("dog", "dogs"), ("miller", "millers"), ("fox", "foxes"), ("child", "children"), ("sailor", "sailors"),
          ("teacher", "teachers"), ("cat", "cats"), ("farmer", "farmers"), ("bird", "birds"), ("baker", "bakers")]
_VERBS = [("sees", "see"), ("carries", "carry"), ("follows", "follow"), ("watches", "watch"), ("finds", "find"),
          ("helps", "help"), ("paints", "paint"), ("calls", "call")]
_INTRANSITIVE = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"), ("laughs", "laugh")]
_PLACES = ["by the river", "in the mill", "near the harbour", "under the old bridge", "at the market",
           "behind the school", "on the hill"]
_TIMES = ["today", "at dawn", "every evening", "in winter", "after the rain"]


def make_text(n_chars: int, seed: int = 0) -> str:
    """At least `n_chars` characters of sentences from the grammar above, a pure function of
    (n_chars, seed)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def noun_phrase():
        plural = bool(torch.randint(2, (1,), generator=g))
        noun = pick(_NOUNS)[plural]
        article = "the" if plural or torch.rand(1, generator=g) < 0.6 else ("an" if noun[0] in "aeiou" else "a")
        if torch.rand(1, generator=g) < 0.5:
            adjective = pick(_ADJECTIVES)
            article = "an" if article in ("a", "an") and adjective[0] in "aeiou" else ("a" if article == "an" else article)
            return f"{article} {adjective} {noun}", plural
        return f"{article} {noun}", plural

    sentences, length = [], 0
    while length < n_chars:
        subject, plural = noun_phrase()
        if torch.rand(1, generator=g) < 0.6:
            sentence = f"{subject} {pick(_VERBS)[plural]} {noun_phrase()[0]}"
        else:
            sentence = f"{subject} {pick(_INTRANSITIVE)[plural]}"
        if torch.rand(1, generator=g) < 0.5:
            sentence += f" {pick(_PLACES)}"
        if torch.rand(1, generator=g) < 0.3:
            sentence += f" {pick(_TIMES)}"
        sentence = sentence[0].upper() + sentence[1:] + ".\n"
        sentences.append(sentence)
        length += len(sentence)
    return "".join(sentences)


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as int64 token ids (0..255)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens) -> str:
    """The text of byte token ids (a tensor or a list); bytes that are not valid UTF-8 show as \ufffd."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(values).decode("utf-8", errors="replace")


class TokenWindows(Dataset):
    """Consecutive, non-overlapping windows of a 1-D token tensor: item i is (x, y) with
    x = tokens[i*T : i*T + T] and y the same shifted by one (the next tokens), T = seq_len."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one window of seq_len {seq_len} (+1)")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int):
        start = i * self.seq_len
        return self.tokens[start:start + self.seq_len], self.tokens[start + 1:start + self.seq_len + 1]


@dataclass(frozen=True)
class TextInfo:
    name: str
    vocab_size: int
    seq_len: int
    num_train_tokens: int
    num_test_tokens: int
    source: str


def get_text_dataset(
    name: str = "synthetic",
    *,
    seq_len: int = 128,
    num_train_tokens: int = 200_000,
    num_test_tokens: int = 20_000,
    seed: int = 0,
) -> tuple[Dataset, Dataset, TextInfo]:
    """(train, test, info) of byte-token windows: `synthetic` (the grammar; sizes from
    num_*_tokens), or a text file (a path, or `$WORKSHOP_DATA/<name>.txt`) split 90/10."""
    if name == "synthetic":
        train = encode(make_text(num_train_tokens, seed))[:num_train_tokens]
        test = encode(make_text(num_test_tokens, seed + 1_000_003))[:num_test_tokens]
        source = f"synthetic(seed={seed})"
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            path = data_root() / f"{name}.txt"
        if not path.is_file():
            raise ValueError(
                f"unknown text data set {name!r}: use 'synthetic', a path to a UTF-8 text file, or the name "
                f"of a file {display_path(data_root())}/<name>.txt ($WORKSHOP_DATA)"
            )
        try:
            tokens = encode(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{display_path(path)} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#x}): "
                             "convert it, e.g. iconv -f latin1 -t utf-8 in.txt > out.txt") from None
        split = int(0.9 * len(tokens))
        train, test, source = tokens[:split], tokens[split:], display_path(path)
    info = TextInfo(name if name == "synthetic" else Path(name).stem, 256, seq_len, len(train), len(test), source)
    return TokenWindows(train, seq_len), TokenWindows(test, seq_len), info


def make_loader(
    dataset: Dataset,
    batch_size: int,
    env: DistEnv | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader. Given a DistEnv with world_size > 1 it reads this rank's shard only: a
    DistributedSampler gives each rank a disjoint 1/world_size of every epoch (call
    `loader.sampler.set_epoch(epoch)` so the shuffle changes). Without `env` every rank reads all."""
    sampler = None
    if env is not None and env.is_distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        shuffle = False
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
        num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
