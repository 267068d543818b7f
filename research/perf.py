"""Model FLOPs, the hardware peak they are measured against (for MFU), and the CPU runtime's
settings for speed."""

import ctypes
import platform
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets. Matched by substring of
# jax.Device.device_kind, first match wins (so 'v5 lite' precedes 'v5').
KNOWN_PEAKS = (
    ('TPU v6 lite', 918e12), ('TPU v6e', 918e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12),
    ('TPU v5p', 459e12), ('TPU v5', 459e12), ('TPU v4', 275e12),
    ('H200', 989e12), ('H100', 989e12), ('A100', 312e12),
)
# HBM per chip (GiB, bytes/s), from the same data sheets, matched the same way (TPU v5 lite =
# v5e, v6 lite = v6e, v5 = v5p; the H100 SXM, the A100's 80 GB model).
KNOWN_HBM = (
    ('TPU v6 lite', 32, 1640e9), ('TPU v6e', 32, 1640e9), ('TPU v5 lite', 16, 819e9),
    ('TPU v5e', 16, 819e9), ('TPU v5p', 95, 2765e9), ('TPU v5', 95, 2765e9),
    ('TPU v4', 32, 1228e9), ('H200', 141, 4800e9), ('H100', 80, 3350e9), ('A100', 80, 2039e9),
)


def compiler_options() -> Optional[dict[str, str]]:
  """XLA options for the train step on this backend. On CPU, the YNNPACK library fusions are
  turned off: with them, the batched matmuls of attention ran at ~60 GFLOP/s instead of ~100,
  and the 10.7M-parameter step of bench/train_throughput.py took 8% longer (jaxlib 0.10.2).

  oneDNN stays off too (measured on a 2-core AMD EPYC, 2026-12-04): with `xla_cpu_use_onednn` and
  `xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT` every dot goes to
  oneDNN, which runs attention's batched matmuls on both cores (1.6x Eigen's single thread; the
  attention of workload (a) alone 31% faster) but the small dense ones slower: step (a) +8%, (b)
  the same. With fusion type `LIBRARY_FUSION_TYPE_DOT` the process dies of SIGILL at the first
  step (a oneDNN graph partition fails to compile inside XLA)."""
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_experimental_ynn_fusion_type': ''}
  return None


def tune_cpu_runtime() -> None:
  """Makes the CPU backend reuse each step's host memory. Call it before JAX's first computation
  (after jax.distributed.initialize, if any).

  XLA:CPU mallocs a compiled computation's temporaries for every call (41 MB per train step of
  bench/train_throughput.py's workload (a), 1.1 GB at (b)). glibc serves allocations over 32 MB
  (64 MB from a thread) with a fresh mmap and unmaps them on free, so every step faulted in all
  its pages again (10k page faults per step at (a), 270k at (b); a quarter of the CPU time in the
  kernel). When JAX computes on the CPU, glibc is told here never to mmap and not to trim freed
  memory (up to 2 GB is kept), and computations on one CPU device run on the calling thread (whose
  malloc arena, unlike a worker thread's, has no size limit). Step time: (a) 54 -> 36 ms, (b) 2.1
  -> 1.9 s. The calling thread then waits for each computation, so host work no longer overlaps
  it: the training loop builds its batches in a thread instead (research/data/prefetch.py).
  """
  jax.config.update('jax_cpu_enable_async_dispatch', False)  # Read when the CPU client starts.
  if (jax.default_backend() == 'cpu' and platform.system() == 'Linux'
      and platform.libc_ver()[0] == 'glibc'):
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc = ctypes.CDLL(None)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # mallopt takes an int.


def step_memory(compiled) -> int:
  """Bytes a compiled step allocates beyond its (already allocated) arguments: temporaries and
  the outputs that do not reuse a donated argument. 0 when XLA gives no memory analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  return int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def free_memory(device) -> int:
  """Bytes free for a computation on `device`: its allocator's limit minus what is in use, or on
  the CPU the host's available memory (/proc/meminfo's MemAvailable). 0 when unknown."""
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    return int(stats.get('bytes_limit', 0) - stats.get('bytes_in_use', 0))
  try:
    with open('/proc/meminfo') as f:
      fields = dict(line.split(':', 1) for line in f)
    return int(fields['MemAvailable'].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return 0


def param_count(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def matmul_param_count(params, expert_fraction: float = 1.0) -> float:
  """Parameters that take part in a matrix multiply per token (6N counts these).

  Excludes vectors (norms), position tables, and the input embedding when it is not also the
  unembedding (a lookup costs no FLOPs). Expert weights (`.../experts/...`) count with
  `expert_fraction` = top_k / num_experts: only the active experts run for a token.
  """
  flat = traverse_util.flatten_dict(params, sep='/')
  tied = not any(k.startswith('unembed') for k in flat)
  return float(sum(np.prod(p.shape) * (expert_fraction if '/experts/' in k else 1.0)
                   for k, p in flat.items()
                   if len(p.shape) >= 2 and not k.startswith('pos_embed')
                   and (tied or not k.startswith('embed'))))


def train_flops_per_token(params, num_layers: int, d_model: int, seq_len: int,
                          expert_fraction: float = 1.0) -> float:
  """6N + 12 L d T: forward+backward matmuls (6 per active parameter) plus attention scores and
  the weighted sum of values (PaLM, Chowdhery et al. 2022, appendix B)."""
  return (6.0 * matmul_param_count(params, expert_fraction)
          + 12.0 * num_layers * d_model * seq_len)


def model_flops_per_token(model: Mapping[str, Any], params: Any, seq_len: int) -> float:
  """`train_flops_per_token` of a decoder or encoder with the config's `model` section (its
  layers, width, and the active share of MoE experts) over sequences of seq_len."""
  return train_flops_per_token(params, model['num_layers'], model['d_model'], seq_len,
                               model['moe_top_k'] / model['num_experts'])


def matmul_probe(n: int = 2048) -> Callable[[], float]:
  """Compiles a float32 [n, n] @ [n, n] matmul on the default device once; the returned function
  runs it once and gives its FLOP/s."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()

  def flops_per_sec() -> float:
    t = time.perf_counter()
    f(x).block_until_ready()
    return 2.0 * n**3 / (time.perf_counter() - t)

  return flops_per_sec


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large jitted float32 matmul on the default device, the best of `repeats` runs.

  The best, as bench/train_throughput.py's probe: a shared machine's slow moments only lower a
  run. Three fresh processes on a 2-core AMD EPYC read 269, 203 and 362 GFLOP/s as the median of
  5 and 367, 208 and 380 as the best (the benchmark's probe: ~400); with the median, the training
  loop's MFU for pretrain_small read 64-70% where the benchmark's read 59-62%."""
  probe = matmul_probe(n)
  return float(max(probe() for _ in range(repeats)))


def datasheet_peak(kind: str) -> Optional[float]:
  """The data sheet's bf16 peak FLOP/s of one chip of `kind` (jax.Device.device_kind), or None."""
  return next((peak for name, peak in KNOWN_PEAKS if name in kind), None)


def chip_hbm(kind: str) -> tuple[float, float] | None:
  """The data sheet's (HBM bytes, HBM bytes/s) of one chip of `kind` (jax.Device.device_kind),
  or None."""
  return next(((gib * 2.0**30, bw) for name, gib, bw in KNOWN_HBM if name in kind), None)


def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s of all devices together, where it came from): `datasheet_peak`, else (CPU) a
  measured float32 matmul (the emulated CPU devices share the same cores, so it is not
  multiplied)."""
  kind = jax.devices()[0].device_kind
  peak = datasheet_peak(kind)
  if peak is not None:
    n = jax.device_count()
    return peak * n, f'{n} x {kind}, bf16 data sheet'
  return measure_matmul_peak(), f'{kind}, measured fp32 matmul'
