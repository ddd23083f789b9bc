"""uniql_recover: a short masked LoRA fine-tune that makes one set of sorted weights serve every pruning rate better.

UniQL's recovery: each step samples one of the bundle's rates, masks every MLP to that rate's widths (the channels
past a layer's width are zeroed at the down projection's input, which is what the runtime's narrowing computes),
and trains rank-`rank` LoRA branches on every linear layer (not the token table or the head) to match the unpruned
model's next-token distributions on the calibration windows (KL(teacher ‖ student), the teacher's log-probabilities
computed once). The branches are then merged into the float weights, W += B·A, before anything is quantized.
Merging keeps the nesting: a channel's update lives in its own gate/up rows and down column, so a width that drops
the channel drops its update too.

Runs the IR's decoder ops in torch (passes/torch_forward.py) on the CPU: `steps` forward and backward passes
over `ctx`-token windows (SmolLM2: seconds each on two cores).
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph, Tensor
from edgeq.core.plan import Plan
from edgeq.models import llama, names
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate import calibration_tokens, calibration_windows
from edgeq.passes.torch_forward import require_torch, torch_forward

RANK = 8
LR = 5e-4              # Adam; the branches start at zero (B = 0), so the first steps do not disturb the model
CTX = 256              # tokens per training window
WINDOWS = 8
SEED = 0


class UniqlRecover(Pass):
    name = "uniql_recover"

    def __init__(self, steps: int, rank: int = RANK, lr: float = LR, ctx: int = CTX, n_windows: int = WINDOWS,
                 subset: tuple[int, int] = (0, 1), seed: int = SEED, source=None):
        """`source`: the calibration text (importers.calibration_text; None: the default)."""
        if steps < 0 or rank < 1:
            raise EdgeqError(None, "--recover-steps must be a non-negative number of steps")
        self.steps, self.rank, self.lr, self.ctx_len = steps, rank, lr, ctx
        self.n_windows, self.subset, self.seed, self.source = n_windows, subset, seed, source

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        if self.steps == 0:
            return graph, plan
        if not plan.pruning or not plan.pruning.get("rates"):
            raise EdgeqError(None, "--recover-steps trains for the bundle's pruning rates: give --pruning-rates")
        torch = require_torch("--recover-steps")
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        tokens, bos, add_bos = calibration_tokens(graph, self.source)
        windows = calibration_windows(tokens, self.ctx_len, self.n_windows, bos, add_bos, self.source, self.subset)
        weights = {n: torch.from_numpy(np.array(t.numpy(), dtype=np.float32)) for n, t in graph.weights.items()}
        head = {names.EMBED, names.LM_HEAD}
        targets = [n for n in llama.linear_weights(graph) if n not in head]
        a = {n: (torch.randn(self.rank, weights[n].shape[1]) / np.sqrt(weights[n].shape[1])).requires_grad_()
             for n in targets}
        b = {n: torch.zeros(weights[n].shape[0], self.rank, requires_grad=True) for n in targets}
        opt = torch.optim.Adam([*a.values(), *b.values()], lr=self.lr)
        with torch.no_grad():
            teacher = [torch.log_softmax(torch_forward(graph, w, weights, torch, {}).double(), -1) for w in windows]
        downs = {llama.mlp_weights(i)[2]: i for i in range(graph.config.n_layers)}
        table = plan.pruning["rates"]
        losses: dict[str, list[float]] = {}
        steps = range(self.steps)
        for step in (ctx.progress(steps, desc="recover (masked LoRA)", unit="step") if ctx.progress else steps):
            entry = table[int(rng.integers(len(table)))]
            k = int(rng.integers(len(windows)))
            masks = {n: (torch.arange(weights[n].shape[1]) < entry["widths"][i]).float() for n, i in downs.items()}

            def edit(name):
                def f(x, out):
                    if name in masks:            # the narrowed MLP: channels past the width contribute nothing
                        x = x * masks[name]
                        out = x @ weights[name].T
                    return out + (x @ a[name].T) @ b[name].T
                return f

            logits = torch_forward(graph, windows[k], weights, torch, {}, {n: edit(n) for n in targets})
            student = torch.log_softmax(logits.double(), -1)
            loss = (teacher[k].exp() * (teacher[k] - student)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.setdefault(str(entry["rate"]), []).append(round(float(loss.detach()), 6))
        deltas = {n: (b[n] @ a[n]).detach().numpy().astype(np.float32) for n in targets}
        new = dict(graph.weights)
        for n, d in deltas.items():
            src = graph.weights[n]
            new[n] = Tensor(n, src.shape, load=lambda s=src, d=d: s.numpy() + d, alias=src.alias,
                            source_format=src.source_format)
        ctx.record(self.name, steps=self.steps, rank=self.rank, lr=self.lr, ctx=self.ctx_len, windows=len(windows),
                   seed=self.seed, loss_by_rate={r: v for r, v in sorted(losses.items())})
        plan.pruning["recovery"] = {"steps": self.steps, "rank": self.rank, "lr": self.lr, "ctx": self.ctx_len,
                                    "windows": len(windows), "adapted": len(targets)}
        return Graph(graph.arch, graph.kind, graph.config, graph.inputs, graph.outputs, graph.nodes, new,
                     dict(graph.metadata)), plan
