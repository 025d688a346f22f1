"""Under torchrun (argv: mode:GRAM_TRIANGLE_BLOCK pairs): for each pair, each process collects the Gram sums of its own
half of a batch, then NewtonMuon.refresh_gram all-reduces them; process 0 saves {pair: every layer's C = sum / n_tokens}
to $GRAMS."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt2 as t  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for pair in sys.argv[1:]:
        mode, block = pair.split(":")
        t.GRAM_TRIANGLE_BLOCK = int(block)  # full C summed as its upper block triangle in blocks of this width
        args = t.parse_args(["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--optimizer", "newton_muon",
                             "--gram", mode, "--gram_block", "16"])
        torch.manual_seed(0)
        model = t.GPT(args)
        opt = t.build_optimizers(model, args)[-1]
        idx = torch.randint(0, args.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
        mine = idx.chunk(world)[rank]
        model.collect_gram(True)
        for micro in mine.chunk(2):  # two micro-batches per process
            model(micro, micro)
        model.collect_gram(False)
        opt.refresh_gram(n_tokens=idx.numel())
        out[pair] = [opt.state[m.weight]["gram"] if "gram" in opt.state[m.weight] else m.gram / idx.numel()
                     for m in model.gram_layers()]
    if rank == 0:
        torch.save(out, os.environ["GRAMS"])
    dist.barrier()
    dist.destroy_process_group()
