"""Where `--cost fisher` loses v_proj's error: the chain of approximations from the true KLD to the cost, per group.

    python bench/fisher_attention.py [--groups v_proj,o_proj,q_proj,up] [--format q4_0] [--samples 4]

bench/additivity_costs.py --groups found the Fisher cost under-predicting v_proj's single-group KLD ~2x
(0.51), the other groups 0.67-1.45x. v_proj is the one linear whose output reaches the residual stream only
through attention's weighted sum over positions, out_t = Σ_s p_ts v_s, so one ΔW gives errors ΔW·x_s that the
attention adds up coherently at every later position. The Fisher cost is a sum over positions of per-position
terms (E[(gᵀδy)²] with the cross-position products dropped). This bench quantizes one group (every tensor of
it in --format, the rest float) and measures on one 512-token calibration window, in float (edgeq's executor and
the Fisher pass's backward):

  - kld:          the true KLD of the error δy_s = ΔW x_s (the perturbation as quantization makes it),
  - kld_signed:   the KLD of ±ΔW x_s with a random sign per position (cross-position products cancel; what a
                  per-position cost can see), mean over --samples sign draws,
  - diag_exact:   ½ Σ_t Σ_o g²_{t,o} (ΔW x_t)²_o / T with g the sampled-label gradient (no factorisation),
  - fisher:       ½ Σ_o F_o (ΔW C_F ΔWᵀ)_oo, the cost `--cost fisher` uses (F, C_F from the same samples),
  - fisher_plain: ½ Σ_o F_o (ΔW C ΔWᵀ)_oo (no token weighting).

kld/kld_signed is the share of the KLD that only cross-position terms carry. Writes
bench/results/fisher_attention.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from additivity_costs import group  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default="v_proj,o_proj,q_proj,up")
    ap.add_argument("--format", default="q4_0")
    ap.add_argument("--samples", type=int, default=4, help="sign draws, and sampled labels for the gradients")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fisher_attention.json"))
    args = ap.parse_args()

    from edgeq.core.executor import Executor
    from edgeq.core.formats import get_format
    from edgeq.evaluate.decoder import log_softmax64
    from edgeq.importers.gguf import import_gguf
    from edgeq.models.recipes.default import default_model_path
    from edgeq.passes import Context
    from edgeq.passes.calibrate import Calibrate, calibration_tokens, calibration_windows
    from edgeq.passes.fisher import _sample, _Tape, backward

    graph = import_gguf(default_model_path())
    ctx = Context(backend="gguf")
    Calibrate().run(graph, None, ctx)
    cal = ctx.analysis["calibration"]
    imatrix = cal.imatrix()
    tokens, bos, add_bos = calibration_tokens(graph)
    win = calibration_windows(tokens, 512, 4, bos, add_bos)[1]       # the window additivity_costs --groups uses
    fmt = get_format(args.format)
    rng = np.random.default_rng(0)
    linear_input = {n.inputs[1]: i for i, n in enumerate(graph.nodes) if n.op == "linear"}

    def logp(edit=None):
        return log_softmax64(Executor(graph, edits=edit).logits(win))

    def kld(ref, lp):
        return float((np.exp(ref) * (ref - lp)).sum(-1)[1:].mean())

    ref = logp()
    out = {"window": "calibration window 1 of 4 (512 tokens)", "format": args.format, "rows": []}
    tape = _Tape(graph)
    for g in args.groups.split(","):
        t0 = time.perf_counter()
        names = [n for n, t in graph.weights.items() if len(t.shape) == 2 and group(n) == g]
        dw = {}
        for n in names:
            w = np.array(graph.weights[n].numpy(), dtype=np.float32)
            dw[n] = fmt.roundtrip(w, imatrix.get(n) if fmt.takes_imatrix else None).astype(np.float32) - w

        def perturb(sign):
            return {n: (lambda x, y, n=n: y + sign[:, None] * (x @ dw[n].T)) for n in names}

        true = kld(ref, logp(perturb(np.ones(len(win), np.float32))))
        signed = []
        for _ in range(args.samples):
            sign = rng.integers(0, 2, len(win)).astype(np.float32) * 2 - 1
            signed.append(kld(ref, logp(perturb(sign))))
        # gradients of sampled labels at the group's outputs: the per-token sum, and F, C_F, C as the Fisher pass
        diag, f_sum, cf_sum, a_tot, c_sum = 0.0, {}, {}, {}, {}
        for _ in range(args.samples):
            _, dlogits = _sample(tape.forward(win), rng)
            linear, _ = backward(tape, win, dlogits)
            for n in names:
                gr = linear[n].astype(np.float64)
                x = tape.args[linear_input[n]][0].astype(np.float64)
                e = x @ dw[n].astype(np.float64).T
                g2 = np.square(gr)
                diag += float((g2 * np.square(e)).sum()) / len(win)
                a = g2.sum(1)
                f_sum[n] = f_sum.get(n, 0) + g2.sum(0)
                cf_sum[n] = cf_sum.get(n, 0) + (x * a[:, None]).T @ x
                a_tot[n] = a_tot.get(n, 0.0) + float(a.sum())
                c_sum[n] = c_sum.get(n, 0) + x.T @ x
            del linear
        fisher = plain = 0.0
        for n in names:
            f = f_sum[n] / (args.samples * len(win))
            d = dw[n].astype(np.float64)
            fisher += float((f * ((d @ (cf_sum[n] / a_tot[n])) * d).sum(1)).sum())
            plain += float((f * ((d @ (c_sum[n] / (args.samples * len(win)))) * d).sum(1)).sum())
        row = {"group": g, "tensors": len(names), "kld": true, "kld_signed": float(np.mean(signed)),
               "kld_signed_draws": signed, "diag_exact": diag / args.samples / 2, "fisher": fisher / 2,
               "fisher_plain": plain / 2}
        row.update({f"{k}_over_kld": row[k] / true for k in ("kld_signed", "diag_exact", "fisher", "fisher_plain")})
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out["rows"].append(row)
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "kld_signed_draws"}), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
