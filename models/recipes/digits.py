"""The reference CNN of the tests: a small residual net trained on scikit-learn's bundled digits.

`load_digits` ships inside scikit-learn (1,797 8x8 grey images, no download), so
a real CNN with real held-out accuracy can be trained in seconds, seeded and
deterministic, and every CNN lowering is judged on real images. The net uses
every piece the CNN family carries that a small classifier needs: conv + batch
norm + relu, a residual add, relu6, max and average pooling, flatten, linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_TEST = 500            # held-out images (the rest train)


@dataclass
class DigitsData:
    x_train: np.ndarray     # (n, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray     # (n,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_data(seed: int = 0) -> DigitsData:
    """The digits split into train and held-out images by a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:N_TEST], order[N_TEST:]
    return DigitsData(x[train], y[train], x[test], y[test])


def digits_net(stem: int = 16, mid: int = 16, conv: int = 32, block: bool = True, block_kernel: int = 3,
               conv_kernel: int = 3, conv_bn: bool = False):
    """The module (untrained). Built lazily so importing edgeq.models.recipes.digits needs no torch. The widths:
    `stem` channels (the stem and the residual block's output, tied by the residual add), `mid` (inside the block),
    `conv` (the last conv); the once-for-all supernet (digits_supernet.py) slices these three, and its elastic depth
    and kernels pick the rest: `block=False` drops the residual block (its input goes straight to the max pool),
    `block_kernel` / `conv_kernel` 1 makes the block's convs / the last conv 1x1 (the centre of the 3x3 kernels);
    `conv_bn` puts a batch norm after the last conv (folded away at import; the supernet's, so that a subnet's
    recalibrated statistics adapt the last conv to what reaches it with the block skipped or kept)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int, m: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c, m, block_kernel, padding=block_kernel // 2, bias=False)
            self.bn1 = nn.BatchNorm2d(m)
            self.conv2 = nn.Conv2d(m, c, block_kernel, padding=block_kernel // 2, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + x)

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, stem, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(stem)
            self.block = Block(stem, mid) if block else nn.Identity()
            self.pool = nn.MaxPool2d(2)                       # 8x8 -> 4x4
            self.conv = nn.Conv2d(stem, conv, conv_kernel, padding=conv_kernel // 2)
            self.cbn = nn.BatchNorm2d(conv) if conv_bn else nn.Identity()
            self.act = nn.ReLU6()
            self.avg = nn.AvgPool2d(2)                        # 4x4 -> 2x2
            self.fc = nn.Linear(conv * 2 * 2, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            x = self.pool(self.block(x))
            x = self.avg(self.act(self.cbn(self.conv(x))))
            return self.fc(torch.flatten(x, 1))

    return DigitsNet()


def train_digits_cnn(seed: int = 0, epochs: int = 8, batch: int = 64):
    """(eval-mode torch module, DigitsData): seeded, single-threaded (so bit-reproducible), a few seconds on a CPU."""
    import torch

    data = load_digits_data(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = digits_net()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        x = torch.from_numpy(data.x_train)
        y = torch.from_numpy(data.y_train)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch):
                idx = perm[i:i + batch]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), data


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == labels))
