"""Mutation check of the optimizer math, the gradient and C scale, the lr schedule, b9979e6's
constants, the defaults and the loss's padding: each mutant below is one semantic change to
train_gpt2.py (a string replaced in a copy), with the tests that must fail on it. For each, the
repo's tests, data/ and records/compare.py are copied with the mutated train_gpt2.py into a
temporary folder and those tests run there (pytest -x -q); the table says which mutants they killed.
Exit status 1 if a mutant survives, its string is not found exactly once, its tests error instead of
failing, or the unmutated copy does not pass them all.

    python tests/mutants.py            # every mutant (54)
    python tests/mutants.py -k soap    # those whose name holds "soap"
    python tests/mutants.py --list     # names and tests only
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPT, GRAM, RULES, LOOP, GOLDEN = ("tests/test_optimizers.py", "tests/test_gram.py", "tests/test_gram_rules.py",
                                  "tests/test_gram_loop.py", "tests/test_golden.py")
AUDIT, BF16 = "tests/test_audit.py", "tests/test_bf16_preconditioner.py"

# (name, what it breaks, old text of train_gpt2.py (exactly once), new text, tests that must kill it)
MUTANTS = [
    # Muon and Newton-Schulz
    ("muon-no-nesterov", "Muon's wide matrices use buf instead of G + m buf",
     "d = torch.add(g, b, alpha=momentum) if nesterov else b", "d = b",
     [f"{OPT}::test_muon_rule_exact"]),
    ("muon-ema-momentum", "Muon's buffer an EMA, buf = m buf + (1 - m) G",
     "b.mul_(momentum).add_(g)", "b.lerp_(g, 1 - momentum)", [f"{OPT}::test_muon_rule_exact"]),
    ("muon-no-shape-scale", "shape_scale ignored (Muon and Newton-Muon)",
     'return [max(1.0, p.size(0) / p.size(1)) ** 0.5 if group["shape_scale"] else 1.0',
     "return [1.0", [f"{OPT}::test_muon_rule_exact", f"{RULES}::test_newton_muon_shape_scale"]),
    ("muon-weight-decay-sign", "Muon's decoupled weight decay (the track's) grows the weights",
     "torch._foreach_mul_(params, 1 - lr * weight_decay)\n        torch._foreach_add_",
     "torch._foreach_mul_(params, 1 + lr * weight_decay)\n        torch._foreach_add_",
     ["tests/test_golden.py::test_track3_muon_equals_the_original"]),
    ("muon-lerp-nesterov-weight", "the lerp form's Nesterov takes 1 - m of the momentum (wide ones)",
     "d = torch.lerp(g, b, momentum) if nesterov else b",
     "d = torch.lerp(g, b, 1 - momentum) if nesterov else b",
     ["tests/test_golden.py::test_track3_muon_equals_the_original"]),
    ("ns-swapped-coefficients", "Newton-Schulz polynomial a I + c A + b A^2 instead of a I + b A + c A^2",
     "B = c * syrk(A).to(acc) + b * A.to(acc) + a * eye", "B = b * syrk(A).to(acc) + c * A.to(acc) + a * eye",
     [f"{OPT}::test_orthogonalize_matches_float64_and_batches"]),
    ("polar-express-last-unscaled", "the 5th Polar Express polynomial without the safety factor",
     "        (3.3184196573706015, -2.488488024314874, 0.51004894012372),\n"
     "        (2.300652019954817, -1.6689039845747493, 0.4188073119525673)]], 1.01),",
     "        (3.3184196573706015, -2.488488024314874, 0.51004894012372)]]\n"
     "        + [(2.300652019954817, -1.6689039845747493, 0.4188073119525673)], 1.01),",
     [f"{RULES}::test_polar_express_coefficients_are_the_papers_with_its_safety_factor"]),
    # PolarGrad
    ("polargrad-no-nuclear-scale", "PolarGrad steps lr O instead of lr ||D||_* O",
     "U = unstack_like(O.to(scale.dtype) * (-lr * scale)[:, None, None], params)",
     "U = unstack_like(O.to(scale.dtype) * (-lr * torch.ones_like(scale))[:, None, None], params)",
     [f"{OPT}::test_polargrad_rule_exact"]),
    ("polargrad-weight-decay-sign", "PolarGrad's decoupled weight decay grows the weights",
     "torch._foreach_mul_(params, 1 - lr * weight_decay)\n        U =",
     "torch._foreach_mul_(params, 1 + lr * weight_decay)\n        U =",
     [f"{OPT}::test_polargrad_rule_exact"]),
    ("polargrad-momentum-weight", "PolarGrad's EMA keeps 1 - b of the old momentum",
     "torch._foreach_lerp_(bufs, grads, 1 - momentum)", "torch._foreach_lerp_(bufs, grads, momentum)",
     [f"{OPT}::test_polargrad_rule_exact"]),
    # SOAP
    ("soap-v-not-permuted", "SOAP's v keeps its rows when the left basis is re-sorted",
     'v.copy_(v.gather(-2, o[..., :, None].expand_as(v)) if side == "L" else', 'v.copy_(v if side == "L" else',
     [f"{OPT}::test_soap_rule_exact"]),
    ("soap-no-bias-correction", "SOAP without Adam's bias correction",
     "alpha=-lr * (1 - b2**t) ** 0.5 / (1 - b1**t))", "alpha=-lr)", [f"{OPT}::test_soap_rule_exact"]),
    ("soap-stale-m", "SOAP's m not carried into the new bases",
     'S["exp_avg"].copy_(_rotate(m, S.get("QL"), S.get("QR")))', 'S["exp_avg"].copy_(S["exp_avg"])',
     [f"{OPT}::test_soap_rule_exact"]),
    # Newton-Muon
    ("newton-muon-precondition-swapped", "momentum of G R and of G swapped (before <-> after)",
     'if precondition == "before":', 'if precondition == "after":',
     [f"{RULES}::test_newton_muon_precondition_rule"]),
    ("newton-muon-absolute-damping", "Newton-Muon's gamma = damping, not damping tr(C)/d",
     'gamma = group["damping"] * trace_over_d(C, group["gram"], group["ridge"] == "block")',
     'gamma = group["damping"]', [f"{RULES}::test_newton_muon_precondition_rule"]),
    ("inverse-sqrt-as-inverse", "gram_f inverse_sqrt computes (C + gamma I)^-1",
     "(l.clamp(min=0) + gamma.squeeze(-1)).rsqrt()", "(l.clamp(min=0) + gamma.squeeze(-1)).reciprocal()",
     [f"{RULES}::test_newton_muon_gram_f"]),
    ("diag-ignores-inverse-sqrt", "gram diag returns 1 / (C + gamma) whatever gram_f says",
     '(C + gamma).rsqrt() if f == "inverse_sqrt" else 1 / (C + gamma)', "1 / (C + gamma)",
     [f"{RULES}::test_newton_muon_gram_f"]),
    ("newton-muon-drops-shape-scale", "--muon_shape_scale not handed to Newton-Muon",
     "lr, muon = self.lr_tensor(group, params[0]), Muon.hyper(params, group)",
     'lr, muon = self.lr_tensor(group, params[0]), Muon.hyper(params, group | {"shape_scale": False})',
     [f"{RULES}::test_newton_muon_shape_scale"]),
    # LocoProp-S
    ("locoprop-ema-momentum", "LocoProp's heavy-ball momentum turned into an EMA",
     "torch._foreach_add_(bufs, grads)\n", 'torch._foreach_add_(bufs, grads, alpha=1 - group["momentum"])\n',
     [f"{RULES}::test_locoprop_lambda_mode"]),
    ("locoprop-relative-lambda-ignored", "lambda_mode relative treated as absolute",
     'if group["lambda_mode"] == "relative":', 'if group["lambda_mode"] == "never":',
     [f"{RULES}::test_locoprop_lambda_mode"]),
    ("locoprop-unscaled-inner-step", "K-step inner step nu, not nu / L (diverges at init)",
     'step = group["nu"] / (eigenvalue_bound(C, group["gram"]) + lam)', 'step = group["nu"]',
     [f"{RULES}::test_locoprop_k_steps_converge_to_the_exact_minimizer", f"{RULES}::test_locoprop_k_step_rule"]),
    ("eigenvalue-bound-fewer-squarings", "the lambda_max bound from tr(C^4)^(1/4) instead of tr(C^16)^(1/16)",
     "squarings: int = 4", "squarings: int = 2", [f"{RULES}::test_eigenvalue_bound"]),
    ("eigenvalue-bound-last-weight", "the bound's last factor t_k^(1/2^(k-1)) instead of t_k^(1/2^k)",
     "log_L = log_L + t.log() / 2**j", "log_L = log_L + t.log() / 2**min(j, squarings - 1)",
     [f"{RULES}::test_eigenvalue_bound"]),
    # Gram collection and refresh
    ("gram-micro-batch-tokens", "C divided by one micro-batch's tokens, not the step's",
     "refresh_gram(n_tokens=args.batch_size * args.sequence_length,",
     "refresh_gram(n_tokens=args.device_batch_size * args.sequence_length,",
     [f"{LOOP}::test_refresh_every_gram_every_steps_with_the_steps_tokens_and_the_ema"]),
    ("gram-last-micro-batch-only", "each forward replaces the Gram sum (the last micro-batch's alone)",
     "        self.gram += part", "        self.gram.copy_(part)",
     [f"{GRAM}::test_collected_gram_equals_hooked_inputs",
      f"{LOOP}::test_refresh_every_gram_every_steps_with_the_steps_tokens_and_the_ema"]),
    ("gram-refresh-only-at-step-0", "C refreshed at step 0 only",
     "refresh = gram_every > 0 and (step + gram_phase) % gram_every == 0",
     "refresh = gram_every > 0 and step == 0",
     [f"{LOOP}::test_refresh_every_gram_every_steps_with_the_steps_tokens_and_the_ema"]),
    ("gram-ema-frozen", "the EMA keeps C from its first refresh",
     'st["gram"].lerp_(new, 1 - group["gram_beta"]))', 'st["gram"])',
     [f"{RULES}::test_locoprop_gram_beta_over_several_refreshes",
      f"{LOOP}::test_refresh_every_gram_every_steps_with_the_steps_tokens_and_the_ema"]),
    ("gram-ema-weight-swapped", "C <- (1 - beta) C + beta C_new",
     'st["gram"].lerp_(new, 1 - group["gram_beta"]))', 'st["gram"].lerp_(new, group["gram_beta"]))',
     [f"{RULES}::test_locoprop_gram_beta_over_several_refreshes"]),
    ("gram-not-mirrored", "the upper-triangle Gram sum not mirrored below the diagonal",
     "gram.copy_(gram.triu() + gram.triu(1).mT)", "gram.copy_(gram.triu())",
     [f"{GRAM}::test_collected_gram_equals_hooked_inputs"]),
    # the Newton-Muon paper's choices (settings; their golden: tests/golden/newton_muon.json)
    ("gram-start-ignored", "gram_start ignored: the first refresh keeps C_new",
     'if "gram" not in st and group["gram_start"] > 0:', 'if False:',
     [f"{RULES}::test_gram_start_is_the_first_refreshes_ema_start",
      f"{GOLDEN}::test_newton_muon_equals_the_papers_code"]),
    ("gram-start-not-per-block", "gram_start's s I filled on the first block only (block mode)",
     "out.diagonal(dim1=-2, dim2=-1).fill_(s)", "out[..., :1, :, :].diagonal(dim1=-2, dim2=-1).fill_(s)",
     [f"{RULES}::test_gram_start_is_the_first_refreshes_ema_start",
      f"{GOLDEN}::test_newton_muon_equals_the_papers_code"]),
    ("gram-phase-ignored", "gram_phase ignored by the loop: refreshes at steps 0, E, 2E, ...",
     "gram_phase = getattr(blocks, \"refresh_phase\", 0)", "gram_phase = 0",
     [f"{LOOP}::test_gram_phase_moves_the_refreshes"]),
    ("gram-ridge-per-matrix", "gram_ridge block ignored: one gamma per matrix",
     'trace_over_d(C, group["gram"], group["ridge"] == "block")', 'trace_over_d(C, group["gram"])',
     [f"{RULES}::test_gram_ridge_block_damps_each_block_by_its_own_trace",
      f"{GOLDEN}::test_newton_muon_equals_the_papers_code"]),
    ("gram-damping-eps-ignored", "gram_damping_eps not added to gamma",
     'return gamma + group["damping_eps"] if group["damping_eps"] else gamma', "return gamma",
     [f"{RULES}::test_gram_ridge_block_damps_each_block_by_its_own_trace",
      f"{GOLDEN}::test_newton_muon_equals_the_papers_code"]),
    ("cholesky-fallbacks-uncounted", "a Cholesky fallback not counted",
     "used = torch.where(failed, boost, used)", "used = used",
     [f"{RULES}::test_cholesky_fallbacks_are_counted_by_the_damping_that_held",
      f"{LOOP}::test_cholesky_fallbacks_are_written_to_the_record"]),
    # R's application (--gram_apply)
    ("gram-apply-fp32-ignored", "--gram_apply fp32 still applies R with bf16 operands on CUDA",
     'return apply == "bf16" and bf16_operands(G)', "return bf16_operands(G)",
     [f"{GRAM}::test_gram_apply_chooses_the_factor_dtype_and_the_product",
      f"{BF16}::test_fp32_application_is_exact_where_bf16_fails_for_g_aligned_with_c"]),
    ("gram-apply-rule-default-operands", "Newton-Muon's rule multiplies G R with the default operands "
     "whatever --gram_apply says", "low = [gram_low(g, apply) for g in grads]",
     "low = [bf16_operands(g) for g in grads]",
     [f"{GRAM}::test_gram_apply_chooses_the_factor_dtype_and_the_product"]),
    # the AdamW groups
    ("embed-adamw-takes-adamw-betas", "the embedding's AdamW takes --adamw_betas",
     "betas=args.embed_betas", "betas=args.adamw_betas", [f"{OPT}::test_adamw_groups_take_their_own_settings"]),
    ("adamw-control-no-weight-decay", "the block AdamW ignores --adamw_weight_decay",
     "**setting_values(cls.settings, args))",
     '**setting_values(cls.settings, args) | {"weight_decay": 0.0})', [f"{OPT}::test_adamw_groups_take_their_own_settings"]),
    # scale: the raw .grad and C, which Muon, Newton-Muon and AdamW cannot see
    ("grad-not-divided-by-accumulation",
     "micro-batch losses summed, not averaged over the accumulation",
     "(scaled / accum).backward()", "scaled.backward()",
     [f"{AUDIT}::test_one_process_accumulated_grad_and_gram_scale"]),
    ("gram-all-reduce-averages", "the processes' Gram sums averaged, not summed (C / world size)",
     "dist.all_reduce(flat)\n", "dist.all_reduce(flat, op=dist.ReduceOp.AVG)\n",
     [f"{AUDIT}::test_two_processes_grad_and_gram_scale"]),
    ("gram-process-tokens", "C divided by one process's tokens, not the step's",
     "refresh_gram(n_tokens=args.batch_size * args.sequence_length,",
     "refresh_gram(n_tokens=args.batch_size // run.world * args.sequence_length,",
     [f"{AUDIT}::test_two_processes_grad_and_gram_scale"]),
    # the lr of every parameter group
    ("embed-lr-unscheduled", "the embedding/head AdamW keeps its base lr, off the schedule",
     'g["lr"] = g["base_lr"] * mult',
     'g["lr"] = g["base_lr"] * (mult if opt is blocks else 1.0)',
     [f"{AUDIT}::test_every_parameter_group_follows_the_lr_schedule"]),
    # b9979e6's embedding AdamW and model constants
    ("embed-adamw-weight-decay", "the embedding's AdamW takes weight decay 0.1 (b9979e6's run.sh "
     "sets it, its AdamW gets 0)",
     'nonnegative("embed_weight_decay", 0.0,', 'nonnegative("embed_weight_decay", 0.1,',
     [f"{AUDIT}::test_embedding_adamw_and_muon_are_b9979e6s"]),
    ("attn-scale-sqrt-layers", "the attention residual scaled by 1/sqrt(L), not 1/sqrt(2 L)",
     "self.attn_scale = 1 / math.sqrt(2 * args.n_layer)",
     "self.attn_scale = 1 / math.sqrt(args.n_layer)", [f"{AUDIT}::test_forward_is_b9979e6s"]),
    ("rms-norm-eps", "RMSNorm's eps 1e-5, not 1e-6",
     "torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)",
     "torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)",
     [f"{AUDIT}::test_forward_is_b9979e6s"]),
    ("rotary-base", "rotary base 1000, not 10000", "base: float = 10000.0", "base: float = 1000.0",
     [f"{AUDIT}::test_forward_is_b9979e6s"]),
    ("init-normal", "the tied embedding/head drawn from N(0, 0.02), not U(+-1/sqrt(d))",
     "        self.transformer.wte.weight = self.lm_head.weight\n",
     "        nn.init.normal_(self.lm_head.weight, std=0.02)\n"
     "        self.transformer.wte.weight = self.lm_head.weight\n",
     [f"{AUDIT}::test_init_is_b9979e6s"]),
    # defaults
    ("default-locoprop-nu", "a default changed (locoprop_nu 1.0 -> 0.5)",
     'Setting("locoprop_nu", 1.0,', 'Setting("locoprop_nu", 0.5,',
     [f"{AUDIT}::test_every_default_is_in_the_table"]),
    # SOAP's branches
    ("soap-shampoo-beta-zero-falls-back", "shampoo_beta 0 taken as the fallback (beta2)",
     's = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else b2',
     's = group["shampoo_beta"] if group["shampoo_beta"] > 0 else b2',
     [f"{AUDIT}::test_soap_shampoo_beta_negative_takes_beta2_and_zero_is_allowed"]),
    ("soap-max-precond-dim-exclusive", "a side of exactly max_precond_dim gets no eigenbasis",
     "if n <= max_dim:", "if n < max_dim:", [f"{AUDIT}::test_soap_max_precond_dim_boundary"]),
    # the fused loss's padding
    ("loss-one-padded-column", "the first padded vocabulary column (logit 0) inside the softmax",
     'z = z.masked_fill(cols >= V, float("-inf"))', 'z = z.masked_fill(cols > V, float("-inf"))',
     [f"{AUDIT}::test_fused_loss_padding_with_a_trained_heads_logits"]),
    ("loss-cap-no-derivative", "the fused loss's soft cap (track3) without its derivative in the gradient",
     "du = (dz * (cap**3 * r**3) if cap else dz).to(x.dtype)", "du = dz.to(x.dtype)",
     ["tests/test_track3.py::test_model_summed_loss_and_gradients_equal_the_golden_figures"]),
    ("track3-fused-cap", "the track's fused loss capped at 14 instead of 15",
     "self.loss_chunk, self.lm_head.bias, 15.0)", "self.loss_chunk, self.lm_head.bias, 14.0)",
     ["tests/test_track3.py::test_model_summed_loss_and_gradients_equal_the_golden_figures"]),
]


def stale(source: str, mutants: list = MUTANTS) -> list[str]:
    """Names of the mutants that cannot be judged against `source` (train_gpt2.py's text): their old text is not in it
    exactly once, equals the new text, or a test they name does not exist."""
    def missing(test: str) -> bool:
        path, func = test.split("::")
        return f"def {func}(" not in (REPO / path).read_text()

    return [name for name, _, old, new, tests in mutants
            if source.count(old) != 1 or old == new or any(map(missing, tests))]


def copy_repo(source: str, into: Path) -> None:
    """train_gpt2.py (as `source`), tests/, data/ (without downloaded shards) and records/compare.py into `into`."""
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "fineweb10B")
    shutil.copytree(REPO / "tests", into / "tests", ignore=ignore)
    shutil.copytree(REPO / "data", into / "data", ignore=ignore)
    (into / "records").mkdir()
    shutil.copy(REPO / "records" / "compare.py", into / "records" / "compare.py")
    (into / "train_gpt2.py").write_text(source)


def run_tests(source: str, tests: list[str]) -> tuple[int, str, float]:
    """pytest -x -q `tests` on a copy of the repo with train_gpt2.py = source: (exit status, output tail, seconds)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy_repo(source, Path(tmp))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=tmp, env=env, capture_output=True, text=True)
        return r.returncode, (r.stdout + r.stderr)[-2000:], time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the mutants whose name holds this")
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.k in m[0]]
    if not chosen:
        print(f"-k {args.k!r}: no mutant's name holds it; names: {' '.join(m[0] for m in MUTANTS)}", file=sys.stderr)
        return 1
    if args.list:
        for name, what, _, _, tests in chosen:
            print(f"{name:34} {what}\n{'':34} {' '.join(tests)}")
        return 0
    original = (REPO / "train_gpt2.py").read_text()
    unusable = stale(original, chosen)
    if unusable:
        print(f"mutants whose text is not in train_gpt2.py exactly once, or whose tests are missing (update "
              f"tests/mutants.py): {' '.join(unusable)}", file=sys.stderr)
        return 1
    every = sorted({test for *_, tests in chosen for test in tests})
    code, tail, seconds = run_tests(original, every)
    if code != 0:
        print(f"the unmutated train_gpt2.py fails its tests ({seconds:.0f}s), so no mutant can be judged:\n{tail}",
              file=sys.stderr)
        return 1
    print(f"unmutated: {len(every)} test functions pass ({seconds:.0f}s)\n")
    print(f"{'mutant':34} {'result':9} {'time':>6}  what it breaks")
    bad = []
    for name, what, old, new, tests in chosen:
        code, tail, seconds = run_tests(original.replace(old, new), tests)
        result = {0: "SURVIVED", 1: "killed"}.get(code, f"error {code}")  # 1: a test failed; else pytest itself did
        print(f"{name:34} {result:9} {seconds:5.0f}s  {what}", flush=True)
        if code != 1:
            bad.append((name, result, tail))
    for name, result, tail in bad:
        print(f"\n{name}: {result}\n{tail}", file=sys.stderr)
    print(f"\n{len(chosen) - len(bad)} of {len(chosen)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
