"""The project's train step against an eager PyTorch GPT of the same shapes, in one run.

  pip install torch          # not in requirements.txt: only this benchmark needs it
  python bench/torch_baseline.py                  # workloads a, b of train_throughput.py
  python bench/torch_baseline.py --workloads=a --min-seconds=20

The baseline is what a researcher would write in PyTorch: pre-LayerNorm GPT blocks with learned
positions, a fused bias-free QKV projection, F.scaled_dot_product_attention (causal), a GELU (tanh)
MLP, the unembedding tied to the embedding, AdamW (foreach) with global-norm clipping, float32,
eager mode, torch's default threads. Both sides get the same batches' shapes, the same FLOP count
(train_throughput's formula) and the same peak: the JAX matmul probe, timed after each window of
steps, so both MFU columns share one denominator. CPU only (the baseline runs on torch's CPU
device).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from bench import train_throughput
from research import perf

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError:
  sys.exit('bench/torch_baseline.py needs PyTorch: pip install torch (a CPU build is enough).')


class Block(nn.Module):
  """x + attn(ln(x)), then x + mlp(ln(x)); x [batch, seq, d]."""

  def __init__(self, d: int, heads: int, hidden: int):
    super().__init__()
    self.heads = heads
    self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
    self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
    self.wi, self.wo = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    q, k, v = (a.view(b, t, self.heads, d // self.heads).transpose(1, 2)
               for a in self.qkv(self.ln1(x)).split(d, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [batch, heads, seq, head_dim]
    x = x + self.out(o.transpose(1, 2).reshape(b, t, d))
    return x + self.wo(F.gelu(self.wi(self.ln2(x)), approximate='tanh'))


class GPT(nn.Module):
  """Token ids [batch, seq] -> logits [batch, seq, vocab]."""

  def __init__(self, vocab: int, layers: int, d: int, heads: int, hidden: int, max_len: int):
    super().__init__()
    self.embed, self.pos_embed = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
    self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
    self.ln_final = nn.LayerNorm(d, eps=1e-6)
    for p in self.parameters():
      if p.dim() >= 2:
        nn.init.normal_(p, std=0.02)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    x = self.embed(tokens) + self.pos_embed(torch.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.ln_final(x) @ self.embed.weight.T


def torch_bench(config, vocab: int, steps: int, warmup: int, window: int,
                min_seconds: float) -> dict:
  """ms/step and MFU of the eager baseline's train step, timed as train_throughput.bench times
  the project's (windows of `window` steps, a JAX matmul probe after each)."""
  m, t = config.model, config.train
  torch.manual_seed(0)
  model = GPT(vocab, m.num_layers, m.d_model, m.num_heads, int(m.ffn_multiplier * m.d_model),
              m.max_len)
  opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2),
                          weight_decay=t.weight_decay, foreach=True)
  params = {name: p.detach().numpy() for name, p in model.named_parameters()}
  flops_per_step = t.batch_size * t.seq_len * perf.train_flops_per_token(
      params, m.num_layers, m.d_model, t.seq_len)
  rng = np.random.default_rng(0)

  def step() -> float:
    tokens = torch.from_numpy(rng.integers(0, vocab, (t.batch_size, t.seq_len + 1)))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip, foreach=True)
    opt.step()
    return loss.item()

  for _ in range(warmup):
    step()
  probe = perf.matmul_probe()
  times, peaks, began = [], [], time.perf_counter()
  while len(times) * window < steps or time.perf_counter() - began < min_seconds:
    t0 = time.perf_counter()
    for _ in range(window):
      step()
    times.append((time.perf_counter() - t0) / window)
    peaks.append(max(probe() for _ in range(3)))
  times, peaks = np.array(times), np.array(peaks)
  return dict(ms_median=float(np.median(times) * 1e3),
              ms_p10=float(np.percentile(times, 10) * 1e3),
              ms_p90=float(np.percentile(times, 90) * 1e3),
              mfu=float(np.median(flops_per_step / times / peaks)))


def torch_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of torch's own float32 [n, n] @ [n, n], the best of `repeats` (the JAX probe's shape,
  timed as train_throughput times it next to each window)."""
  x = torch.randn(n, n)
  x @ x
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    x @ x
    times.append(time.perf_counter() - t0)
  return 2.0 * n**3 / min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workloads', default='a,b', help="train_throughput's dense workloads")
  parser.add_argument('--steps', type=int, default=20, help='timed steps, at least')
  parser.add_argument('--min-seconds', type=float, default=10.0)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--window', type=int, default=4)
  args = parser.parse_args()
  perf.tune_cpu_runtime()
  probe = perf.matmul_probe()
  torch_gf, jax_gf = torch_matmul_flops() / 1e9, max(probe() for _ in range(5)) / 1e9
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; [2048, 2048] matmul (best '
        f'of 5): torch {torch_gf:.0f} GFLOP/s, JAX {jax_gf:.0f}; MFU against the JAX probe, with '
        'train_throughput.py\'s FLOP formula')
  print(f'{"workload":8} {"ours ms":>9} {"p10-p90":>15} {"MFU":>6} {"torch ms":>9} '
        f'{"p10-p90":>15} {"MFU":>6} {"speedup":>8}')
  for name in args.workloads.split(','):
    config, vocab = train_throughput.workload(name)
    if config.model.moe_every:
      sys.exit(f'workload {name} is an MoE model; the baseline is dense (workloads a, b, c).')
    ours = train_throughput.bench(config, vocab, args.steps, args.warmup, args.window, None,
                                  args.min_seconds)
    base = torch_bench(config, vocab, args.steps, args.warmup, args.window, args.min_seconds)
    print(f'{name:8} {ours["ms_median"]:>9.1f} {ours["ms_p10"]:>7.1f}-{ours["ms_p90"]:<7.1f} '
          f'{ours["mfu"]:>6.1%} {base["ms_median"]:>9.1f} '
          f'{base["ms_p10"]:>7.1f}-{base["ms_p90"]:<7.1f} {base["mfu"]:>6.1%} '
          f'{base["ms_median"] / ours["ms_median"]:>7.2f}x', flush=True)


if __name__ == '__main__':
  main()
