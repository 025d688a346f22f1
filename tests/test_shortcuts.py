"""Every numerical shortcut taken for speed, against the plain computation it replaces (CPU)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._functorch.aot_autograd import aot_module_simplified
from torch.nn.parallel import DistributedDataParallel as DDP

import train_gpt2 as t
from test_optimizers import ns64  # the record's Newton-Schulz form, in any dtype


@pytest.mark.parametrize("V", [1000, 1024])
@pytest.mark.parametrize("N,chunk", [(300, 7), (300, 128), (300, 300), (300, 1000)])
def test_linear_cross_entropy_equals_fp32_logits(N, chunk, V):
    """Loss and both gradients of the chunked fused loss equal F.cross_entropy on whole fp32 logits, for chunks that
    do and do not divide N, under an upstream gradient other than 1, for a vocabulary it pads (1000 -> 1024 rows, the
    padded logits out of the softmax) and one it does not."""
    torch.manual_seed(0)
    x = torch.randn(N, 64, requires_grad=True)
    w = torch.randn(V, 64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[:2] = torch.tensor([0, V - 1])  # the first and last real logit as targets
    ref = F.cross_entropy(x @ w.T, y)
    gx, gw = torch.autograd.grad(3 * ref, (x, w))
    loss = t.linear_cross_entropy(x, w, y, chunk)
    fx, fw = torch.autograd.grad(3 * loss, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fx, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(t.linear_cross_entropy(x, w, y, chunk), ref, rtol=1e-6, atol=1e-6)


def run_interpreted(kernel: str, check: str) -> None:
    """Run `check` in a subprocess under Triton's interpreter (the Triton kernels on CPU tensors), after a prelude that
    imports torch, F and train_gpt2 as t, counts the launches of t.<kernel> in `grids` (the kernel, not its torch
    fallback, ran; the uncounted kernel stays as `kernel`) and seeds a generator `g`; the check prints "ok" last."""
    pytest.importorskip("triton")
    prelude = f"""
import torch, torch.nn.functional as F, train_gpt2 as t
assert t.triton is not None and t.TRITON_INTERPRETED
grids, kernel = [], t.{kernel}
class Counted:
    def __getitem__(self, grid):
        grids.append(grid)
        return kernel[grid]
t.{kernel} = Counted()
g = torch.Generator().manual_seed(0)
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", prelude + check], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


LOSS_CHECK = r"""
for block in (256, 2048):  # several loads a row with a partial last one; one load with lanes that never hold a logit
    t.LOSS_TILE["BLOCK"] = block
    for V, chunk in ((1000, 7), (1000, 300), (1024, 128)):  # 1000 is padded to 1024 rows of W, 1024 is not
        N = 300
        x = torch.randn(N, 32, generator=g, requires_grad=True)
        w = torch.randn(V, 32, generator=g, requires_grad=True)
        y = torch.randint(0, V, (N,), generator=g)
        y[:2] = torch.tensor([0, V - 1])  # the first and last real logit as targets
        ref = F.cross_entropy(x @ w.T, y)
        gx, gw = torch.autograd.grad(3 * ref, (x, w))
        loss = t.linear_cross_entropy(x, w, y, chunk)
        fx, fw = torch.autograd.grad(3 * loss, (x, w))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fx, gx, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-7)
assert len(grids) == 2 * (43 + 1 + 3) and grids[0] == (7,), (len(grids), grids[:1])
# in place over z: padding columns (whatever they held) come out 0, the rest scale (softmax - onehot); L = lse - z[t]
z = torch.randn(5, 1024, generator=g) * 4
z[:, 1000:] = 7.0
y = torch.tensor([0, 999, 5, 500, 17])
z64, rows = z[:, :1000].double(), torch.empty(5)
ref = torch.softmax(z64, -1)
ref[torch.arange(5), y] -= 1
kernel[(5,)](z, y, rows, 1000, 1024, z.stride(0), 0.5, 0.0, **t.LOSS_TILE)
assert torch.equal(z[:, 1000:], torch.zeros(5, 24)), "padding out of dz"
torch.testing.assert_close(z[:, :1000].double(), 0.5 * ref, rtol=0, atol=1e-7)
torch.testing.assert_close(rows.double(), torch.logsumexp(z64, -1) - z64[torch.arange(5), y], rtol=1e-6, atol=1e-6)
# bf16, the trainer's dtype: the kernel against the torch ops of the CPU path, dz within bf16 rounding
x, w = torch.randn(64, 32, generator=g).bfloat16(), torch.randn(1024, 32, generator=g).bfloat16()
w[1000:] = 0
y = torch.randint(0, 1000, (64,), generator=g)
kern = t._ce_chunk(x, w, y, 1 / 64, 1000)
t.TRITON_INTERPRETED = False
ops = t._ce_chunk(x, w, y, 1 / 64, 1000)
torch.testing.assert_close(kern[0], ops[0], rtol=1e-6, atol=1e-5)
for a, b in zip(kern[1:3], ops[1:3]):
    assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
assert kern[3] is None and ops[3] is None
# the track's head: a bias and the soft cap 15 u / sqrt(u^2 + 15^2), in fp32 against autograd and in bf16 against the
# torch ops of the CPU path
t.TRITON_INTERPRETED = True
for V, chunk in ((1000, 7), (1024, 128)):
    N = 300
    x = torch.randn(N, 32, generator=g, requires_grad=True)
    w = (3 * torch.randn(V, 32, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    u = x @ w.T + b
    ref = F.cross_entropy(15 * u * (u.square() + 225).rsqrt(), y)
    want = torch.autograd.grad(3 * ref, (x, w, b))
    loss = t.linear_cross_entropy(x, w, y, chunk, b, 15.0)
    got = torch.autograd.grad(3 * loss, (x, w, b))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
assert len(grids) == 2 * (43 + 1 + 3) + 1 + (43 + 3), len(grids)
x, w = torch.randn(64, 32, generator=g).bfloat16(), (3 * torch.randn(1024, 32, generator=g)).bfloat16()
b = torch.randn(1024, generator=g).bfloat16()
w[1000:], b[1000:] = 0, 0
kern = t._ce_chunk(x, w, y[:64] % 1000, 1 / 64, 1000, b, 15.0)
t.TRITON_INTERPRETED = False
ops = t._ce_chunk(x, w, y[:64] % 1000, 1 / 64, 1000, b, 15.0)
torch.testing.assert_close(kern[0], ops[0], rtol=1e-6, atol=1e-5)
for a, c in zip(kern[1:], ops[1:]):
    assert ((a.float() - c.float()).norm() / c.float().norm()) < 1e-2
print("loss kernel ok")
"""


@pytest.mark.slow
def test_loss_kernel_in_the_triton_interpreter():
    """The fused loss's softmax kernel (CUDA's path), run by Triton's interpreter on CPU: linear_cross_entropy equals
    F.cross_entropy on fp32 logits (loss, both gradients) for padded and unpadded vocabularies, chunks that do and do
    not divide N, several loads a row and lanes that never hold a logit; dz overwrites z with 0 in the padding; in bf16
    it matches the torch ops of the CPU path."""
    run_interpreted("_softmax_xent_kernel", LOSS_CHECK)


def tiny_model_loss_and_grads(settings: list[str], compiled: bool = False, saved: list | None = None,
                              backend="inductor", ddp_bucket_mb: float | None = None) -> list:
    """[loss, every parameter's gradient] of a 2-layer, 64-wide model (seed 0) on one batch of 3 x 50 tokens, with
    `settings`; compiled: through torch.compile (with `backend`); saved: collects the numel of every tensor saved for
    the backward; ddp_bucket_mb: the model in DDP with buckets of this size (a process group must exist)."""
    args = t.parse_args(["--n_layer", "2", "--n_head", "2", "--n_embd", "64", *settings])
    torch.manual_seed(0)
    model = t.GPT(args)
    idx = torch.randint(0, args.vocab_size, (3, 50))
    if compiled:
        torch._dynamo.reset()
    hooks = (torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x)
             if saved is not None else contextlib.nullcontext())
    run = model if ddp_bucket_mb is None else DDP(model, broadcast_buffers=False, bucket_cap_mb=ddp_bucket_mb)
    with hooks:
        loss = (torch.compile(run, backend=backend) if compiled else run)(idx, idx.roll(1, 1))
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


def test_model_loss_and_gradients_with_and_without_fused_loss():
    """The whole model: --loss_chunk 0 (fp32 logits) and --loss_chunk 64 give the same loss and parameter gradients,
    the tied embedding/head included."""
    grads = [tiny_model_loss_and_grads(["--loss_chunk", chunk]) for chunk in ("0", "64")]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("coeffs", list(t.NS_COEFFS))
def test_orthogonalize_is_as_close_to_float64_as_the_record_form(coeffs):
    """X = a X + (b A + c A A) X is the record's a X + b A X + c A (A X) rearranged: in bf16 it is at least as close to
    the float64 polynomial as the record's form (measured: 1.2-4.4% vs 1.5-6.2% relative Frobenius error)."""
    torch.manual_seed(1)
    for shape in ((96, 384), (384, 96), (128, 128), (256, 1024)):
        G = torch.randn(*shape) @ torch.diag(torch.logspace(-2, 0, shape[1]))
        ref = ns64(G.double(), coeffs)  # the record's form in float64 and, below, in bf16
        ours = ((t.orthogonalize(G, coeffs).double() - ref).norm() / ref.norm()).item()
        rec = ((ns64(G.bfloat16(), coeffs).double() - ref).norm() / ref.norm()).item()
        assert ours < 1.1 * rec + 2e-3 and ours < 0.05, (shape, ours, rec)


def test_batched_orthogonalization_equals_per_matrix():
    """Matrices of one shape are orthogonalized as one batch: each result equals orthogonalizing it alone."""
    torch.manual_seed(2)
    G = torch.randn(5, 64, 192)
    batched = t.orthogonalize(G)
    for i in range(5):
        torch.testing.assert_close(batched[i], t.orthogonalize(G[i]), rtol=0, atol=1e-2)
        assert (batched[i].float() - t.orthogonalize(G[i]).float()).norm() < 1e-2 * batched[i].float().norm()


SYRK_CHECK = r"""
BS = t.SYRK_TILE["BS"]
# partial tiles in m and k; m below one tile; whole tiles; a transposed (non-contiguous) view
cases = [torch.randn(2, 300, 200, generator=g), torch.randn(1, 50, 70, generator=g),
         torch.randn(3, 2 * BS, 128, generator=g), torch.randn(2, 200, 300, generator=g).mT]
for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
    for X in cases:
        X = X.to(dtype)
        C = t.syrk(X)
        ref = X.double() @ X.double().mT
        err = ((C.double() - ref).abs().max() / ref.abs().max()).item()
        assert C.dtype == dtype and C.shape == ref.shape and err < tol, (dtype, X.shape, err)
        tile = torch.arange(C.size(-1)) // BS
        off = tile[:, None] != tile[None, :]  # outside the diagonal tiles: each entry is its mirror's copy
        assert torch.equal(C[..., off], C.mT[..., off]), "the mirrored tiles are the computed ones, transposed"
assert len(grids) == 2 * len(cases) and grids[0] == (3, 3, 2), grids[:1]
# orthogonalize runs it for both of its products (X X^T and A A): in fp32, equal to the plain-matmul form
t.NS_DTYPE = torch.float32
G = torch.randn(2, 100, 300, generator=g)
del grids[:]
O = t.orthogonalize(G)
assert len(grids) == 10, len(grids)
t.TRITON_INTERPRETED = False
ref = t.orthogonalize(G)
assert len(grids) == 10 and (O - ref).abs().max() < 1e-4 * ref.abs().max(), (O - ref).abs().max()
print("syrk ok")
"""


@pytest.mark.slow
def test_syrk_kernel_in_the_triton_interpreter():
    """Newton-Schulz's X X^T and A A through the Triton syrk kernel (CUDA's path), run by Triton's interpreter on CPU:
    only tiles on/above the diagonal multiplied, the rest mirrored; equal to the float64 product for partial tiles, a
    matrix smaller than one tile and a transposed view, in fp32 and fp16 (the interpreter has no bf16 matmul)."""
    run_interpreted("_syrk_kernel", SYRK_CHECK)


def test_orthogonalize_normalizes_through_the_trace_at_any_gradient_scale():
    """The first Newton-Schulz step takes ||G||_F^2 = tr(G G^T) from its own A = G G^T instead of a normalizing pass:
    the result equals orthogonalizing G / ||G||_F (what the record does first) within bf16 rounding, for gradients
    from 1e-6 to 1e6 (the unnormalized bf16 product neither underflows nor overflows there)."""
    torch.manual_seed(4)
    for shape in ((96, 384), (384, 96)):
        G = torch.randn(*shape) @ torch.diag(torch.logspace(-2, 0, shape[1]))
        unit = t.orthogonalize(G / G.norm()).double()
        for scale in (1e-6, 1e-3, 1.0, 1e3, 1e6):
            O = t.orthogonalize(G * scale).double()
            assert O.isfinite().all()
            assert (O - unit).norm() < 2e-2 * unit.norm(), (shape, scale, ((O - unit).norm() / unit.norm()).item())


@pytest.mark.parametrize("opt", ["muon", "polargrad", "muon_shape_scale"])
def test_transposed_shapes_batched_together_equal_each_alone(opt):
    """Muon and PolarGrad batch an m x n and an n x m matrix as one stack (the n x m one transposed): each matrix's
    update equals running the optimizer on it alone."""
    torch.manual_seed(5)
    make = {"muon": lambda ps: t.Muon(ps, lr=0.02), "polargrad": lambda ps: t.PolarGrad(ps, lr=0.02),
            "muon_shape_scale": lambda ps: t.Muon(ps, lr=0.02, shape_scale=True)}[opt]
    p0 = [torch.randn(48, 96), torch.randn(96, 48), torch.randn(96, 48)]
    gs = [[torch.randn_like(p) for p in p0] for _ in range(3)]
    together = [p.clone().requires_grad_() for p in p0]
    alone = [[p.clone().requires_grad_()] for p in p0]
    opts = [make(together)] + [make(ps) for ps in alone]
    assert len({o.batch_key(p) for o, p in ((opts[0], p) for p in together)}) == 1  # one batch
    for g in gs:
        for p, gi in zip(together, g):
            p.grad = gi.clone()
        for ps, gi in zip(alone, g):
            ps[0].grad = gi.clone()
        for o in opts:
            o.step()
    for p, ps in zip(together, alone):
        torch.testing.assert_close(p, ps[0], rtol=0, atol=1e-6)
    assert not torch.equal(together[1], together[2])


@pytest.mark.slow
def test_gelu_recompute_leaves_loss_and_gradients_unchanged():
    """--recompute_gelu 1 (GELU checkpointed: under torch.compile its output is recomputed in the backward, not saved
    for c_proj's weight gradient) gives the same loss and gradients as saving it, and saves one d_hidden-wide tensor
    less per layer. Compiled on CPU, as the trainer compiles the model on CUDA (eager autograd would still save it)."""
    out = []
    for recompute in ("0", "1"):
        saved: list[int] = []
        out.append((tiny_model_loss_and_grads(["--recompute_gelu", recompute], compiled=True, saved=saved), sum(saved)))
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert out[1][1] == out[0][1] - 2 * 3 * 50 * 4 * 64, (out[0][1], out[1][1])  # GELU's output, both layers


@pytest.mark.slow
def test_gelu_recompute_survives_the_graph_splits_of_ddp(tmp_path):
    """Under DDP, torch.compile splits the model's graph at gradient-bucket boundaries, right before a parameter's
    first use. A split between GELU and c_proj made GELU's output a saved graph output again (measured: 26.9 GB peak
    on 2 and 4 GPUs against 22.7 on one). With 1 MB buckets in a 256-wide model the splits fall inside the MLPs, and
    the recompute still leaves GELU's output unsaved in both layers."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        saved = {r: [] for r in ("0", "1")}
        for r in saved:
            tiny_model_loss_and_grads(["--n_embd", "256", "--recompute_gelu", r], compiled=True, saved=saved[r],
                                      ddp_bucket_mb=1)
    finally:
        dist.destroy_process_group()
    assert sum(saved["0"]) - sum(saved["1"]) == 2 * 3 * 50 * 4 * 256


@pytest.mark.slow
@pytest.mark.parametrize("gram", ["full", "block", "diag"])
def test_gelu_recompute_holds_on_the_steps_that_collect_c(gram):
    """A feature-gram refresh step also sums the Gram of c_proj's input, GELU's output, inside the checkpointed GELU +
    c_proj region. Compiled as the trainer does it, the backward still recomputes GELU: the tensors saved for it take
    the bytes of a step that does not collect (a GELU outside the region, for the Gram, made torch.compile's CSE merge
    the two and save GELU's output: Newton-Muon's bench peak was 29,663 MiB against Muon's 22,658 on an H100), and C
    equals the eager model's."""
    def run(collect: bool, compiled: bool = True):
        args = t.parse_args(["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--recompute_gelu", "1",
                             "--gram_block", "32"])
        torch.manual_seed(0)
        model = t.GPT(args)
        model.setup_gram(gram, args.gram_block)
        model.collect_gram(collect)
        idx = torch.randint(0, args.vocab_size, (3, 50))
        torch._dynamo.reset()
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda x: saved.setdefault(x.untyped_storage().data_ptr(), x.untyped_storage().nbytes()) and x,
                lambda x: x):
            loss = (torch.compile(model) if compiled else model)(idx, idx.roll(1, 1))
        loss.backward()
        model.collect_gram(False)
        return sum(saved.values()), [m.gram.clone() for m in model.gram_layers()]

    plain, _ = run(False)
    collecting, C = run(True)
    assert collecting == plain, (plain, collecting)
    _, C_eager = run(True, compiled=False)
    assert len(C) == 8 and all(c.abs().sum() > 0 for c in C)
    for a, b in zip(C, C_eager):  # to fp32 rounding of entries up to ~400 (compiled and eager round differently)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.slow
def test_gelu_recompute_recomputes_gelu_and_no_matmul():
    """The checkpointed region holds GELU and c_proj's matmul: the backward graph (torch.compile's partitioner, the
    min-cut one Inductor uses) recomputes GELU once per layer and has exactly the matmuls it has without the recompute."""
    def counts(recompute: str) -> tuple[int, int]:
        graphs = {}

        def keep(name):
            return lambda gm, _: graphs.setdefault(name, gm) and make_boxed_func(gm)

        backend = lambda gm, inputs: aot_module_simplified(gm, inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                                                           partition_fn=min_cut_rematerialization_partition)
        tiny_model_loss_and_grads(["--recompute_gelu", recompute], compiled=True, backend=backend)
        ops = [str(n.target) for n in graphs["bw"].graph.nodes if n.op == "call_function"]
        return (sum(o.startswith(("aten.mm", "aten.bmm", "aten.addmm")) for o in ops),
                sum(o.startswith("aten.gelu.") for o in ops))
    (mm0, gelu0), (mm1, gelu1) = counts("0"), counts("1")
    assert (gelu0, gelu1) == (0, 2) and mm1 == mm0 > 0, (mm0, gelu0, mm1, gelu1)


def spd(k: int, d: int, dtype=torch.float64) -> torch.Tensor:
    X = torch.randn(k, 4 * d, d, dtype=dtype) * torch.logspace(-1, 1, d, dtype=dtype)
    return X.mT @ X / (4 * d)


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
def test_batched_gram_factor_equals_per_matrix_inverse(mode):
    """gram_factor over a stack of C's with one gamma each equals (C_i + gamma_i I)^-1 computed one by one."""
    torch.manual_seed(3)
    C = spd(3, 32)
    gammas = torch.tensor([0.1, 0.5, 2.0], dtype=C.dtype)
    if mode == "block":
        C = torch.stack([torch.stack([c[i * 8:(i + 1) * 8, i * 8:(i + 1) * 8] for i in range(4)]) for c in C])
    if mode == "diag":
        C = C.diagonal(dim1=-2, dim2=-1)
    R = t.gram_factor(C, gammas, mode)
    for i in range(3):
        if mode == "full":
            want = torch.linalg.inv(C[i] + gammas[i] * torch.eye(32, dtype=C.dtype))
        elif mode == "block":
            want = torch.linalg.inv(C[i] + gammas[i] * torch.eye(8, dtype=C.dtype))
        else:
            want = 1 / (C[i] + gammas[i])
        torch.testing.assert_close(R[i], want, rtol=1e-9, atol=1e-12)
    # relative damping from trace_over_d, batched, equals the one-matrix value
    assert torch.allclose(t.trace_over_d(C, mode)[1], t.trace_over_d(C[1], mode))


def test_gram_factor_boosts_damping_only_where_cholesky_fails():
    """A matrix whose C + gamma I is not positive definite (gamma too small for its negative eigenvalue) is retried with
    10x gamma; its neighbour in the batch keeps gamma."""
    good = torch.eye(4, dtype=torch.float64)
    bad = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5], dtype=torch.float64))  # + 0.1 I: not PD; + 1.0 I: PD
    R = t.gram_factor(torch.stack([good, bad]), 0.1, "full")
    torch.testing.assert_close(R[0], torch.linalg.inv(good + 0.1 * torch.eye(4, dtype=torch.float64)))
    torch.testing.assert_close(R[1], torch.linalg.inv(bad + 1.0 * torch.eye(4, dtype=torch.float64)))
    with pytest.raises(torch.linalg.LinAlgError):
        t.gram_factor(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.1, "full")


@pytest.mark.parametrize("mode", ["full", "block"])
def test_bf16_preconditioner_application_is_within_bf16_of_fp32(mode):
    """On CUDA, G R runs with bf16 operands: on CPU, forcing that path gives the fp32 product to bf16 precision."""
    torch.manual_seed(4)
    G = torch.randn(48, 32)
    C = spd(1, 32, torch.float32)[0]
    if mode == "block":
        C = torch.stack([C[i * 8:(i + 1) * 8, i * 8:(i + 1) * 8] for i in range(4)])
    R = t.gram_factor(C, 0.2, mode)
    exact = t.right_precondition(G, R, mode, low_precision=False)
    low = t.right_precondition(G, R, mode, low_precision=True)
    assert low.dtype == G.dtype
    assert ((low - exact).norm() / exact.norm()).item() < 1e-2
    assert (low != exact).any()  # the low-precision path really ran


def test_blocked_cholesky_and_triangular_inverse_equal_torch():
    """cholesky_blocked and tri_inverse (panels of b columns, n not a multiple of b, two batch dims) give
    torch.linalg.cholesky's L (reading A's lower triangle only) and the exact inverse in float64; gram_upper gives the
    exact L^-T L^-1 (lower) and X^T X of a general tall X, matmul_upper X U for upper triangular U, both from
    block triangles; a matrix that is not positive definite is flagged with
    cholesky_ex's info (the order of the first failing leading minor) whichever panel it falls in."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 3, 150, 100, dtype=torch.float64, generator=g)
    A = X.mT @ X / 150 + 0.05 * torch.eye(100, dtype=torch.float64)
    L, info = t.cholesky_blocked(A, 32)
    assert (info == 0).all()
    assert ((L - torch.linalg.cholesky(A)).norm() / L.norm()).item() < 1e-13
    Linv = t.tri_inverse(L, 32)
    assert torch.equal(Linv, Linv.tril())
    assert ((Linv @ L - torch.eye(100, dtype=torch.float64)).abs().max()).item() < 1e-11
    ref = Linv.mT @ Linv  # A^-1 from the upper block triangle of X^T X, mirrored
    assert ((t.gram_upper(Linv, lower=True, b=32) - ref).norm() / ref.norm()).item() < 1e-14
    for b in (16, 32):  # 7 blocks, and 4 with a short last one (n < 4b: the plain product)
        gram = t.gram_upper(X, b=b)
        assert ((gram - X.mT @ X).norm() / gram.norm()).item() < 1e-14
        assert torch.equal(gram, gram.mT) or b == 32  # mirrored from blocks
        U = Linv.mT
        assert ((t.matmul_upper(X, U, b) - X @ U).norm() / (X @ U).norm()).item() < 1e-14
    upper_nan = A.masked_fill(torch.ones(100, 100, dtype=torch.bool).triu(1), float("nan"))
    assert torch.equal(t.cholesky_blocked(upper_nan, 32)[0], L)  # the strict upper triangle is never read
    for bad in (10, 70):  # in the first panel, and in a later one
        B = A.clone()
        B[1, 2, bad, bad] = -1.0
        expect = torch.linalg.cholesky_ex(B)[1]
        got = t.cholesky_blocked(B, 32)[1]
        assert got[1, 2].item() == expect[1, 2].item() == bad + 1 and (got.flatten()[:5] == 0).all()


@pytest.mark.parametrize("what", ["orthonormalize", "gram_factor", "gram_factor_with_boost"])
def test_linalg_panel_width_leaves_results_unchanged(monkeypatch, what):
    """SOAP's orthonormalize and the feature-gram factor (including the per-matrix damping boost where a Cholesky
    fails) give the same result in float64 with one panel (LINALG_BLOCK >=
    n) and with 16-column panels; the panels really are used."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 48, 48, generator=g, dtype=torch.float64)
    gamma = torch.full((2, 3), 1e-3, dtype=torch.float64)
    if what == "orthonormalize":
        run = lambda: t.orthonormalize(A)
    else:
        C = A @ A.mT / 48
        if what == "gram_factor_with_boost":
            C[1, 2] -= 0.005 * torch.eye(48, dtype=torch.float64)  # fails with gamma, not with 10 gamma
        run = lambda: t.gram_factor(C, gamma, "full")
    whole = run()
    calls = []
    chol = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda M, **k: (calls.append(M.shape[-1]), chol(M, **k))[1])
    monkeypatch.setattr(t, "LINALG_BLOCK", 16)
    panels = run()
    assert calls and all(n == 16 for n in calls), calls
    assert ((panels - whole).norm() / whole.norm()).item() < 1e-10
