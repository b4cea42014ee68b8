"""Item `cost`: the cost model's step time and all-to-all share for this config on this machine.

    matching profile (configs/profiles/) -> its GEMM phases scaled by measured / profile time (item gemm),
    its link replaced by the measured latency and bandwidth (item a2a) = this machine's profile
    -> `coe-dist bench project` at the config's world and ep size -> step ms, all-to-all share,
       next to the step time the training item measured
"""

from __future__ import annotations

import dataclasses

from coe_dist.bench.model import Affine, Link, Profile
from coe_dist.bench.project import project
from coe_dist.check.verdict import PASS, WARN, Context, Verdict
from coe_dist.errors import UserError

# Measured / predicted step time outside this range: the model misses something on this machine.
AGREEMENT = 3.0


def this_machine(ctx: Context) -> Profile:
    """The matching profile with this check's GEMM and all-to-all measurements in place of its own."""
    prof = dataclasses.replace(ctx.profile, links=dict(ctx.profile.links), gemm=dict(ctx.profile.gemm),
                               phases=dict(ctx.profile.phases))
    over = prof.oversubscription(ctx.ranks_per_node)
    if "gemm_expected_seconds" in ctx.found:
        scale = ctx.found["gemm_seconds"] / ctx.found["gemm_expected_seconds"]
        for key in ("experts_fwd", "experts_bwd"):
            base = prof.phase(key, ctx.cfg.train.dtype)
            prof.phases[key] = Affine(base.fixed_s * scale, base.per_unit_s * scale, "scaled by the measured GEMM",
                                      base.per_unit2_s * scale)
    if "a2a" in ctx.found:
        a2a = ctx.found["a2a"]
        name = "intra" if ctx.ep_size <= ctx.ranks_per_node or "inter" not in prof.links else "inter"
        prof.links[name] = Link(a2a["latency_s"] / over, 0.0, a2a["bandwidth_Bps"] * over, "measured by the check")
    return prof


def check_cost(ctx: Context) -> Verdict:
    if ctx.profile is None:
        return Verdict("cost", WARN, "no profile in configs/profiles/ matches this device: pass --profile to "
                                     "predict the step time")
    try:
        row = project(this_machine(ctx), [ctx.cfg], [ctx.world], ep_mode=str(ctx.ep_size))[0]
    except UserError as e:
        return Verdict("cost", WARN, f"the cost model cannot predict this config on profile "
                                     f"{ctx.profile.name}: {e}")
    text = (f"predicted {row['step_ms']:.1f} ms/step ({row['moe_layers_ms']:.1f} in CoE layers), all-to-all "
            f"{row['a2a_ms']:.1f} ms = {row['a2a_share'] * 100:.1f}% of the step, {row['tokens_per_s_per_gpu']:,.0f} "
            f"tokens/s per rank (profile {ctx.profile.name} with this machine's GEMM and link)")
    data = {"prediction": row}
    measured = ctx.found.get("step_s")
    if measured is None:
        return Verdict("cost", PASS, text, data)
    ratio = measured * 1e3 / row["step_ms"]
    data["measured_step_s"] = measured
    text += f"; the training item measured {measured * 1e3:.1f} ms/step ({ratio:.2f}x)"
    if not 1 / AGREEMENT <= ratio <= AGREEMENT:
        return Verdict("cost", WARN, text + ": the model leaves out part of this machine's step (see "
                                            "docs/scaling.md)", data)
    return Verdict("cost", PASS, text, data)
