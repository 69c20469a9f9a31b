"""Input pipeline: makd's training loader against a bare torchvision ImageFolder + DataLoader, on JPEG files.

The data: a generated ImageFolder of JPEGs (default 5,000 images of 256-500 px per side in 10 classes, smooth random
content so that they compress and decode like photographs), written once into a cache folder ($MAKD_CACHE or
~/.cache/makd, `input-pipeline-<options>`) and reused by later runs.

All arms: RandomResizedCrop 224 + horizontal flip, floats, normalisation; the same batch size and loader processes
(persistent, 2 batches prefetched each), pinned memory and non-blocking copies with `--device cuda`.
- bare: what a person writes by hand — torchvision.datasets.ImageFolder with a v2 transform (crop and flip on the
  PIL image, then to a float tensor, normalised per image), a shuffling DataLoader.
- makd: `makd.engine.classification.training_loader` over makd's ImageSplit of the same folder — every batch's
  draws seeded by its step (SeededFetch), decoding and augmentation in the loader processes. makd normalises in the
  student (its first layer, so that a checkpoint alone predicts), not in the loader.
- makd + normalisation: the same, followed by the student's own normalisation `(x - mean).div_(std)` on the
  device: on a GPU two kernels; on the CPU it runs in the training process, beside the loader processes.

Each round iterates one pass of `--per-round` images (the same random subset for every arm) through each arm, the
arms in a rotating order; the loaders (and their processes) are made once. Medians over the rounds. The last line
is `images_per_s_vs_bare=<makd + normalisation / bare> without_normalisation_vs_bare=<makd / bare>`: the headline
compares the same work (normalised batches where the model reads them); the goal is >= 0.95 for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP threads when the CPU is shared

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from torch.utils.data import DataLoader, SubsetRandomSampler  # noqa: E402
from torchvision import datasets  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from makd.data.base import cores_per_process  # noqa: E402
from makd.data.imagefolder import load_imagefolder  # noqa: E402
from makd.data.transforms import SplitDataset, build_transform, input_spec  # noqa: E402
from makd.engine.classification import training_batches, training_loader  # noqa: E402
from makd.engine.seeding import SeededBatch, derive_seed  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = 10


def make_image(seed: int) -> Image.Image:
    """A 256-500 px image of smooth colour fields, shapes and a little grain: JPEG-compresses like a photograph."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(256, 501, 2))
    low = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def ensure_folder(images: int, seed: int) -> Path:
    """The cached ImageFolder (root/train/<class>/<n>.jpg), generated into a temporary folder then renamed."""
    options = {"images": images, "seed": seed, "classes": CLASSES, "format": 1}
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(os.environ.get("MAKD_CACHE", Path.home() / ".cache" / "makd")) / f"input-pipeline-{key}"
    if (root / "done.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    start = time.perf_counter()
    try:
        for c in range(CLASSES):
            (tmp / "train" / f"class{c}").mkdir(parents=True)

        def write(n: int) -> None:
            make_image(derive_seed(seed, n)).save(tmp / "train" / f"class{n % CLASSES}" / f"{n:05d}.jpg", quality=90)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(write, range(images)))
        (tmp / "done.json").write_text(json.dumps(options))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated {images} JPEGs in {root} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return root


def timed(batches: Iterable[torch.Tensor]) -> tuple[int, float]:
    """(images, seconds) of one pass; the device finishes its copies before the clock stops."""
    start, count = time.perf_counter(), 0
    for x in batches:
        count += len(x)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count, time.perf_counter() - start


def bare_arm(root: Path, batch: int, workers: int, device: torch.device) -> Callable[[list[int]], Iterable[torch.Tensor]]:
    transform = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    folder = datasets.ImageFolder(str(root / "train"), transform=transform)
    sampler = SubsetRandomSampler([])  # shuffles the round's images (it runs in this process: set per pass)
    more = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    loader = DataLoader(folder, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        **more)

    def one_pass(indices: list[int]) -> Iterable[torch.Tensor]:
        sampler.indices = indices
        for x, _ in loader:
            yield x.to(device, non_blocking=True)

    return one_pass


def makd_arm(root: Path, batch: int, workers: int, device: torch.device,
             normalise: bool) -> Callable[[list[int]], Iterable[torch.Tensor]]:
    split = load_imagefolder(root, "train")
    spec = input_spec(split, 224)
    dataset = SplitDataset(split, build_transform(spec, train=True, augment="resized_crop_flip"), spec)
    batches: list[SeededBatch] = []
    loader = training_loader(dataset, batches, workers, 2, device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    passes = iter(range(1 << 30))

    def one_pass(indices: list[int]) -> Iterable[torch.Tensor]:
        epoch = next(passes)
        order = np.random.default_rng(epoch).permutation(indices).tolist()
        batches[:] = [SeededBatch(order[k:k + batch], derive_seed(0, epoch, k)) for k in range(0, len(order), batch)]
        for x, _, _ in training_batches(loader, list(batches), device):
            x = x.to(device, non_blocking=True)
            yield (x - mean).div_(std) if normalise else x  # the student's first layer: makd/models/student.py

    return one_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="JPEGs in the generated folder (cached)")
    parser.add_argument("--per-round", type=int, default=1000, help="images each arm loads per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="auto", help="loader processes of both arms (auto: the cores of this "
                        "process, as makd's data.num_workers gives a GPU run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where batches are copied to")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("input_pipeline: --device cuda, but no GPU is present")
    workers = cores_per_process() if args.workers == "auto" else int(args.workers)
    root = ensure_folder(args.images, seed=0)
    arms = {"makd": makd_arm(root, args.batch_size, workers, device, normalise=False),
            "makd + normalisation": makd_arm(root, args.batch_size, workers, device, normalise=True),
            "bare": bare_arm(root, args.batch_size, workers, device)}
    rng = np.random.default_rng(1)
    warm = rng.choice(args.images, min(args.images, 4 * args.batch_size * max(1, workers)), replace=False).tolist()
    for one_pass in arms.values():  # start the loader processes, fill the page cache
        timed(one_pass(warm))
    rates: dict[str, list[float]] = {name: [] for name in arms}
    print(f"{args.per_round} of {args.images} JPEGs per round, batch {args.batch_size}, {workers} loader processes, "
          f"device {device}", file=sys.stderr)
    for round_ in range(args.rounds):
        subset = rng.choice(args.images, min(args.per_round, args.images), replace=False).tolist()
        names = list(arms)[round_ % len(arms):] + list(arms)[:round_ % len(arms)]
        for name in names:
            count, seconds = timed(arms[name](subset))
            rates[name].append(count / seconds)
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f} images/s" for n in arms), file=sys.stderr)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print("| loader | images/s (median) |")
    print("|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} |")
    print(f"images_per_s_vs_bare={median['makd + normalisation'] / median['bare']:.3f} "
          f"without_normalisation_vs_bare={median['makd'] / median['bare']:.3f}")

if __name__ == "__main__":
    main()
