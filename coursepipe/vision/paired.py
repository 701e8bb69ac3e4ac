"""Paired augmentation for segmentation: the mask moves with its image (torchvision.transforms.v2).

transforms.v2 transforms an Image and its Mask (tv_tensors) together: one draw of the random
parameters per call, applied to both, bilinear for the image and always nearest-neighbour for the
mask, so a mask never gets a class value between two others. That is what the hand-written
augmenter (vision/augment.py, batched homographies on images only) would have to grow; a
well-kept library does it already, so segmentation uses v2 and the classifier keeps its own.

The knobs are the same `Augment` section as the classifiers' (fastai's get_transforms). v2 draws
one set of parameters per call for the whole batch, so every sample is transformed on its own;
draws come from torch's RNG forked and seeded by (seed, step), so a resumed run replays them and
the global RNG is untouched. Area the transform brings in from outside the frame is black in the
image and IGNORE in the mask (not scored, not learnt).
"""
from __future__ import annotations

import torch

from coursepipe.export.portable_segmentation import IGNORE
from coursepipe.learn.loop import Callback
from coursepipe.vision.augment import Augment


def pipeline(aug: Augment):
    """The v2 transform for (Image, Mask) pairs from the Augment knobs (identity when all off)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
    steps = []
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    geometric = []
    if aug.max_rotate > 0 or aug.max_zoom > 1 or aug.max_translate > 0:
        geometric.append(v2.RandomAffine(degrees=aug.max_rotate,
                                         translate=(aug.max_translate,) * 2 if aug.max_translate > 0 else None,
                                         scale=(1.0, aug.max_zoom), fill=fill))
    if aug.max_warp > 0:
        geometric.append(v2.RandomPerspective(distortion_scale=aug.max_warp, p=1.0, fill=fill))
    if geometric and aug.p_affine > 0:
        steps.append(v2.RandomApply(geometric, p=aug.p_affine))
    if aug.max_lighting > 0 and aug.p_lighting > 0:  # colour transforms pass masks through untouched
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=aug.max_lighting, contrast=aug.max_lighting)],
                                    p=aug.p_lighting))
    return v2.Compose(steps)


def augment_pairs(x: torch.Tensor, y: torch.Tensor, transform, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) and int64 masks (B, H, W), each pair transformed together with
    draws seeded by `seed` (the global RNG is left as it was)."""
    from torchvision import tv_tensors

    xs, ys = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for img, mask in zip(x, y):
            a, b = transform(tv_tensors.Image(img), tv_tensors.Mask(mask))
            xs.append(a.as_subclass(torch.Tensor))
            ys.append(b.as_subclass(torch.Tensor))
    return torch.stack(xs), torch.stack(ys)


class AugmentPairs(Callback):
    """Replace every training batch's (image, mask) by augmented pairs (validation untouched)."""
    order = 5

    def __init__(self, aug: Augment, seed: int):
        self.transform, self.seed = pipeline(aug), seed

    def before_batch(self):
        learn = self.learn
        if not learn.training:
            return
        x, y = augment_pairs(learn.xb[0].cpu(), learn.yb.cpu(), self.transform,
                             self.seed * 1_000_003 + learn.step)
        learn.xb, learn.yb = (x.to(learn.device),), y.to(learn.device)
