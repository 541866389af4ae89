"""A synthetic VOC2007-layout directory from an ImageFolder pair (the demo data), to try ``eval.py voc07`` offline.

    python -m evaluation.voc_demo data/demo/train data/demo/val runs/voc_demo

The train folder becomes ``trainval``, the val folder ``test``. The 20 VOC class files are filled from the folder
classes (K of them, class index y): VOC class j < K is positive on images of class j; class j >= K is positive on
images of class (j - K) or (j - K + 1) mod K, so labels are multi-label (each image is positive for 1 to 3 classes);
every 17th negative image of a class is marked difficult (-1). Images are symlinked, not copied. This is not PASCAL
VOC data: numbers on it only show that the command runs end to end.
"""

from __future__ import annotations

import argparse
import os
import sys

from evaluation.voc07 import VOC_CLASSES


def synthetic_label(j: int, y: int, k: int, index: int) -> int:
    """VOC label (1 / 0 / -1) of VOC class ``j`` for an image of folder class ``y`` of ``k`` (see module doc)."""
    positive = y == j if j < k else y in ((j - k) % k, (j - k + 1) % k)
    return 1 if positive else (-1 if index % 17 == 0 else 0)


def build(train_dir: str, val_dir: str, out: str) -> dict[str, int]:
    """Write the layout under ``out``; returns the number of images per split."""
    from torchvision.datasets import ImageFolder

    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new directory")
    os.makedirs(os.path.join(out, "JPEGImages"))
    os.makedirs(os.path.join(out, "ImageSets", "Main"))
    counts = {}
    for split, folder in (("trainval", train_dir), ("test", val_dir)):
        data = ImageFolder(folder)
        k = len(data.classes)
        rows = []
        for n, (path, y) in enumerate(data.samples):
            image_id = f"{split}_{n:06d}"
            os.symlink(os.path.abspath(path), os.path.join(out, "JPEGImages", f"{image_id}.jpg"))
            rows.append((image_id, y, n))
        for j, cls in enumerate(VOC_CLASSES):
            with open(os.path.join(out, "ImageSets", "Main", f"{cls}_{split}.txt"), "w") as f:
                f.writelines(f"{i} {synthetic_label(j, y, k, n):2d}\n" for i, y, n in rows)
        counts[split] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_dir")
    p.add_argument("val_dir")
    p.add_argument("out")
    args = p.parse_args(argv)
    try:
        counts = build(args.train_dir, args.val_dir, args.out)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['trainval']} trainval / {counts['test']} test images (synthetic labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
