"""A once-for-all supernet of the digits CNN: any prefix of each stage's channels is a working smaller CNN.

The digits CNN (digits.py) has three channel widths a search can slice: `stem` (the stem conv and the residual
block's output, tied by the residual add), `mid` (inside the block) and `conv` (the last conv, read by the
classifier through a 2x2 flatten), and, as once-for-all does, an elastic depth and kernel size: the residual block
kept or skipped (`block` 1/0) and the block's convs and the last conv at 3x3 or 1x1 (`block_kernel`,
`conv_kernel`: the centre of the 3x3 kernels). At batch 1 the recipe's widths are overhead-bound (bench/
search_cnn.py: a kernel call costs about as much as its arithmetic), so slimming channels alone cannot remove much
time; skipping the block removes three kernels (two convs and the residual add) and a 1x1 conv skips im2col.
Training follows once-for-all (OFA), compressed to CPU minutes:

1. the full network is trained as usual (the digits recipe's schedule);
2. each stage's channels are sorted by importance (the L1 norm of each output filter, times its batch norm's
   |gamma| / sigma where one follows; the stem stage sums its two producers, the stem and the block's second conv),
   and every tensor that reads them is permuted alike, so the function is unchanged and a width is a prefix;
3. sandwich training (slimmable networks' rule): each step runs the largest, the smallest and two random points
   (widths, depth, kernels) on the same batch, plus the full widths at the first random point's depth and kernels
   (so the shallow and 1x1 shapes are trained at full width too), the largest on the labels and the others
   distilled from its soft outputs (in-place distillation), gradients summed. Batch norm uses batch statistics while training; a subnet gets its own
   statistics afterwards, recalibrated on training images (OFA's BN recalibration), before it is exported.
4. an elastic-depth phase (OFA's progressive shrinking: depth gets a phase of its own after the rest): the same
   sandwich steps, restarted at a higher learning rate, with the block-skipped subnet at full widths added to every
   step. Without it the block-skipped subnets ended 1.6-2.4 points below the full model on the test images at seeds
   1 and 2 (float, 16/16/32 3x3: 0.968 vs 0.992, 0.976 vs 0.994) while the same shape trained alone reached 0.982
   and 0.990; 40 epochs at 3e-3 left 0.984 vs 0.990 (seed 1). Tried, not kept: the block-skipped subnet in every step of
   the sandwich phase itself (the full model fell to 0.961, s32), a private batch norm affine for the last conv
   with the block skipped (no change), a frozen phase-1 teacher (the full model fell 0.2-0.6 points), labels as
   well as distillation for the block-skipped subnet (no change), the phase at 1e-3 (0.978 vs 0.992, seed 1).

Data: the digits recipe's training images are split once more (seeded) into training and validation images; the
search labels configurations on the validation images only, and the held-out test images stay for the report.
Everything is seeded and single-threaded, so the same seed gives the same supernet bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.models.cnn import StageLayer
from edgeq.models.recipes.digits import DigitsData, digits_net, load_digits_data

STAGES = ("stem", "mid", "conv", "block", "block_kernel", "conv_kernel")
CHANNEL_STAGES = 3          # the first three stages are channel widths; the rest are elastic depth and kernels
BASE_WIDTHS = (16, 16, 32)
ELASTIC_MENUS = ([0, 1], [1, 3], [1, 3])     # the residual block skipped / kept; 1x1 or 3x3 kernels
DEPTH_STAGES = (3,)         # the elastic stages that skip layers (0 = skipped)
DEPTH_LR = 3e-3             # the elastic-depth phase's learning rate (1e-3 left seed 1's shallow subnet 1.4 points lower)
N_VAL = 300                 # validation images taken from the digits training split
RECAL_IMAGES = 512          # training images a subnet's batch norm statistics are recalibrated on
MENU_STEPS = 8              # widths per stage: k/8 of the full width, k = 2..8


@dataclass
class SearchData:
    """Training images (the supernet's, calibration, BN recalibration), validation images (the search's labels),
    held-out test images (the report only)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def search_data(seed: int = 0) -> SearchData:
    d: DigitsData = load_digits_data(seed)
    order = np.random.default_rng([seed, 1]).permutation(len(d.y_train))
    val, train = order[:N_VAL], order[N_VAL:]
    return SearchData(d.x_train[train], d.y_train[train], d.x_train[val], d.y_train[val], d.x_test, d.y_test)


class DigitsSupernet:
    """The trained supernet: its stages, menus and sliced layers (data for the search), and its subnets."""

    name = "digits"
    stages = STAGES

    channel_stages = CHANNEL_STAGES

    def __init__(self, net, data: SearchData, scale: int, seed: int):
        self.net = net                      # the full-width torch module, channels sorted
        self.data = data
        self.scale = scale
        self.seed = seed
        channels = [w * scale for w in BASE_WIDTHS]
        self.full = channels + [max(m) for m in ELASTIC_MENUS]
        self.menus = [sorted({f * k // MENU_STEPS for k in range(2, MENU_STEPS + 1)}) for f in channels] + \
            [list(m) for m in ELASTIC_MENUS]
        self.layers = [StageLayer("stem.weight", 0, None, 9, 64, fixed_in=1),          # 8x8 pixels
                       StageLayer("block.conv1.weight", 1, 0, 9, 64, depth_stage=3, kernel_stage=4),
                       StageLayer("block.conv2.weight", 0, 1, 9, 64, depth_stage=3, kernel_stage=4),
                       StageLayer("conv.weight", 2, 0, 9, 16, kernel_stage=5),         # 4x4 after the max pool
                       StageLayer("fc.weight", None, 2, 4, 1, fixed_out=10)]            # 2x2 per channel

    def point(self, widths) -> tuple[int, ...]:
        """All six stage values: channel widths alone (the old three-stage points) keep full depth and kernels."""
        w = tuple(int(v) for v in widths)
        return w + tuple(self.full[len(w):])

    @property
    def example(self) -> np.ndarray:
        return self.data.x_test[:1]

    def forward(self, x, widths):
        """The sliced network on a batch (batch statistics in batch norm: the training forward)."""
        import torch
        import torch.nn.functional as F

        s, m, c, block, bk, ck = self.point(widths)
        n = self.net

        def bn(y, mod, k):
            return F.batch_norm(y, None, None, mod.weight[:k], mod.bias[:k], training=True)

        x = torch.relu(bn(F.conv2d(x, n.stem.weight[:s], padding=1), n.bn, s))
        if block:
            y = torch.relu(bn(F.conv2d(x, _centre(n.block.conv1.weight[:m, :s], bk), padding=bk // 2), n.block.bn1, m))
            y = bn(F.conv2d(y, _centre(n.block.conv2.weight[:s, :m], bk), padding=bk // 2), n.block.bn2, s)
            x = torch.relu(y + x)
        x = F.max_pool2d(x, 2)
        conv = F.conv2d(x, _centre(n.conv.weight[:c, :s], ck), n.conv.bias[:c], padding=ck // 2)
        x = F.avg_pool2d(F.relu6(bn(conv, n.cbn, c)), 2)
        fc = n.fc.weight.view(10, self.full[2], 4)[:, :c].reshape(10, c * 4)
        return F.linear(torch.flatten(x, 1), fc, n.fc.bias)

    def subnet(self, widths, recalibrate: bool = True):
        """The plain digits CNN of these widths (eval mode), its weights the supernet's prefixes and its batch
        norm statistics recalibrated on training images (or the full network's, sliced, with recalibrate=False:
        enough to time it)."""
        import torch

        s, m, c, block, bk, ck = self.point(widths)
        sub = digits_net(s, m, c, block=bool(block), block_kernel=bk, conv_kernel=ck, conv_bn=True)
        src = self.net.state_dict()
        cut = {"stem.weight": (s,), "bn": (s,), "block.conv1.weight": (m, s), "block.bn1": (m,),
               "block.conv2.weight": (s, m), "block.bn2": (s,), "conv.weight": (c, s), "conv.bias": (c,),
               "cbn": (c,)}
        kernel = {"block.conv1.weight": bk, "block.conv2.weight": bk, "conv.weight": ck}
        wanted = set(sub.state_dict())
        out = {}
        for k, v in src.items():
            if k not in wanted:
                continue                    # the skipped block's tensors
            if k == "fc.weight":
                out[k] = v.view(10, self.full[2], 4)[:, :c].reshape(10, c * 4).clone()
                continue
            key = k if k in cut else k.rsplit(".", 1)[0]
            shape = cut.get(key)
            if shape is None or v.ndim == 0:
                out[k] = v.clone()
            else:
                v = v[tuple(slice(0, n) for n in shape)]
                out[k] = (_centre(v, kernel[k]) if k in kernel else v).clone()
        sub.load_state_dict(out)
        if recalibrate:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for mod in sub.modules():
                    if isinstance(mod, torch.nn.BatchNorm2d):
                        mod.reset_running_stats()
                        mod.momentum = None         # a cumulative average over the recalibration batches
                sub.train()
                x = torch.from_numpy(self.data.x_train[:RECAL_IMAGES])
                with torch.no_grad():
                    for i in range(0, len(x), 128):
                        sub(x[i:i + 128])
            finally:
                torch.set_num_threads(threads)
        return sub.eval()

    def loss(self, widths, split: str = "val") -> float:
        """Cross-entropy of the recalibrated float subnet on the validation (or test) images: the search's cheap
        label (passes/search_cnn.cross_entropy: why not the 0/1 error)."""
        import torch

        from edgeq.passes.search_cnn import cross_entropy

        x, y = (self.data.x_val, self.data.y_val) if split == "val" else (self.data.x_test, self.data.y_test)
        sub = self.subnet(widths)
        with torch.no_grad():
            logits = sub(torch.from_numpy(x)).numpy()
        return cross_entropy(logits, y)


def _centre(w, k: int):
    """The centre k x k of 3x3 kernels (once-for-all's elastic kernel size, without its transform matrices: the
    sandwich training trains the shared centre for both sizes)."""
    if k == w.shape[-1]:
        return w
    lo = (w.shape[-1] - k) // 2
    return w[..., lo:lo + k, lo:lo + k]


def _importance(w, bn=None):
    """Per output channel: the filter's L1 norm, times |gamma| / sigma of the batch norm after it."""
    import torch

    imp = w.detach().abs().flatten(1).sum(1)
    if bn is not None:
        imp = imp * (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps))
    return imp


def sort_channels(net, full: list[int]) -> None:
    """Permute every stage's channels by decreasing importance (in place; the network's function is unchanged)."""
    import torch

    def perm(imp):
        return torch.argsort(-imp, stable=True)

    def bn_take(bn, p):
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.data = t.data[p].clone()

    with torch.no_grad():
        b = net.block
        p = perm(_importance(net.stem.weight, net.bn) + _importance(b.conv2.weight, b.bn2))
        net.stem.weight.data = net.stem.weight.data[p].clone()
        bn_take(net.bn, p)
        b.conv1.weight.data = b.conv1.weight.data[:, p].clone()
        b.conv2.weight.data = b.conv2.weight.data[p].clone()
        bn_take(b.bn2, p)
        net.conv.weight.data = net.conv.weight.data[:, p].clone()
        q = perm(_importance(b.conv1.weight, b.bn1))
        b.conv1.weight.data = b.conv1.weight.data[q].clone()
        bn_take(b.bn1, q)
        b.conv2.weight.data = b.conv2.weight.data[:, q].clone()
        r = perm(_importance(net.conv.weight, net.cbn))
        net.conv.weight.data = net.conv.weight.data[r].clone()
        net.conv.bias.data = net.conv.bias.data[r].clone()
        bn_take(net.cbn, r)
        net.fc.weight.data = net.fc.weight.data.view(10, full[2], 4)[:, r].reshape(10, full[2] * 4).clone()


def untrained_digits_supernet(seed: int = 0, scale: int = 1) -> DigitsSupernet:
    """The supernet's structure with initial weights: enough to time its subnets (speed does not depend on the
    values) before any training."""
    import torch

    torch.manual_seed(seed)
    return DigitsSupernet(digits_net(*(w * scale for w in BASE_WIDTHS), conv_bn=True).eval(), search_data(seed),
                          scale, seed)


def train_digits_supernet(seed: int = 0, scale: int = 1, full_epochs: int = 8, sandwich_epochs: int = 60,
                          batch: int = 64, progress=None, depth_epochs: int = 40) -> DigitsSupernet:
    """Train, sort, sandwich-train and depth-train the supernet (seeded, one thread: the same seed gives the same
    weights)."""
    import torch
    import torch.nn.functional as F

    data = search_data(seed)
    full = [w * scale for w in BASE_WIDTHS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = digits_net(*full, conv_bn=True)
        x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        epochs = range(full_epochs + sandwich_epochs + depth_epochs)
        it = iter(epochs if progress is None else progress(epochs, desc="supernet: train", unit="epoch"))

        def run(lr: float, n_epochs: int, step) -> None:
            """Adam with a cosine schedule over `n_epochs` of shuffled batches; `step(idx)` backpropagates."""
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, n_epochs))
            for _ in range(n_epochs):
                next(it, None)
                order = torch.randperm(len(y), generator=g)
                for i in range(0, len(y), batch):
                    opt.zero_grad()
                    step(order[i:i + batch])
                    opt.step()
                sched.step()

        # 1. the full network
        net.train()
        run(3e-3, full_epochs, lambda idx: F.cross_entropy(net(x[idx]), y[idx]).backward())
        # 2. channels sorted by importance: every width is a prefix
        sort_channels(net, full)
        sn = DigitsSupernet(net, data, scale, seed)
        # 3. sandwich training: largest, smallest, two random points per step (widths, depth and kernels)
        largest = tuple(sn.full)
        smallest = tuple(m[0] for m in sn.menus)

        cs = sn.channel_stages
        shallow = largest[:cs] + tuple(0 if i in DEPTH_STAGES else v for i, v in enumerate(largest[cs:], cs))

        def sandwich(idx, always: tuple = ()) -> None:
            big = sn.forward(x[idx], largest)
            F.cross_entropy(big, y[idx]).backward()
            soft = F.softmax(big.detach(), -1)
            rand = [tuple(m[int(torch.randint(len(m), (1,), generator=g))] for m in sn.menus) for _ in range(2)]
            shape = rand[0][cs:]                # the full widths at a random depth and kernel size
            extra = [largest[:cs] + shape] if shape != largest[cs:] else []
            for w in [smallest] + rand + extra + [w for w in always if w not in extra]:
                F.kl_div(F.log_softmax(sn.forward(x[idx], w), -1), soft, reduction="batchmean").backward()

        run(1e-3, sandwich_epochs, sandwich)
        # 4. elastic depth: the block-skipped subnet at full widths in every step too
        run(DEPTH_LR, depth_epochs, lambda idx: sandwich(idx, (shallow,)))
        for _ in it:
            pass
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return sn
