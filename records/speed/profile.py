"""Kernel table and time of the compiled model's forward+backward on one 64x1024 micro-batch (bf16 autocast), record
config; argv[1] = old|new: the fused loss's chunk as the compiled torch ops (the code before) or the kernel."""
import sys, time, torch
sys.path.insert(0, ".")
import train_gpt2 as t
which = sys.argv[1]
args = t.parse_args(sys.argv[2:])
def old_chunk(x, w, tt, scale, V):  # the code before: the chunk's softmax as torch ops, compiled
    z = (x @ w.mT).float()
    cols = torch.arange(z.size(-1), device=z.device)
    z = z.masked_fill(cols >= V, float("-inf"))
    lse = z.logsumexp(-1, keepdim=True)
    hit = cols == tt[:, None]
    loss = (lse.squeeze(-1) - z.masked_fill(~hit, 0).sum(-1)).sum()
    dz = ((z - lse).exp() - hit.float()).mul(scale).to(x.dtype)
    return loss, dz @ w, (dz.mT @ x)[:V]
if which == "old":
    t._ce_chunk = torch.compile(old_chunk, dynamic=False)
torch.manual_seed(0)
model = t.GPT(args).cuda()
cm = torch.compile(model)
x = torch.randint(0, 50257, (64, 1024), device="cuda"); y = torch.randint(0, 50257, (64, 1024), device="cuda")
def mb():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = cm(x, y)
    loss.backward()
for _ in range(3): mb()
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(10): mb()
torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / 10
print(f"{which}: micro-batch fwd+bwd: {dt*1000:.2f} ms  ({t.flops_per_token(args)*65536/dt/1e12:.1f} TFLOP/s)")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(2): mb()
    torch.cuda.synchronize()
rows = []
for e in prof.key_averages():
    us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    if us > 0:
        rows.append((us / 2000, e.count // 2, e.key))
rows.sort(reverse=True)
for ms, c, k in rows[:40]:
    print(f"{ms:7.2f} ms x{c:<4d} {k[:140]}")
print(f"total {sum(r[0] for r in rows):.1f} ms (incl. nested)")
