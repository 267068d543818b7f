"""llama_1b: a Llama 3.2 1B-shaped model, between gpt2_124m and llama3_8b, compiled ahead.

16 layers, d_model 2048, 32 query heads and 8 key/value heads, SwiGLU FFN of 8192, RMSNorm,
RoPE with theta 500,000, tied embeddings, vocabulary 128,256, context 4096; otherwise llama3_8b's
recipe (bfloat16 compute over float32 weights, scanned layers, model.remat=dots, the loss's
logits 256 positions at a time); 256 sequences (1M tokens) per step as 4 micro-batches of 64.

  python launch.py --experiment=llama_1b --mode=compile --topology=v5e-64

Expected (jax 0.10.2, libtpu 0.0.42.1; the README's compile table has the figures): 4.2 GiB per
v5e chip of 16 with one sequence per chip per micro-batch, 1.14x the analytic floor.
"""

from experiments import llama3_8b


def get_config():
  c = llama3_8b.get_config()  # Its recipe, at Llama 3.2 1B's shape.
  c.model.update(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, ffn_multiplier=4.0,
                 tie_embeddings=True, max_len=4096)
  c.train.update(steps=100_000, batch_size=256, grad_accum_steps=4, seq_len=4096)
  return c
