"""llama_1b: a Llama 3.2 1B-shaped model, between gpt2_124m and llama3_8b, compiled ahead.

16 layers, d_model 2048, 32 query heads and 8 key/value heads, SwiGLU FFN of 8192, RMSNorm,
RoPE with theta 500,000, tied embeddings, vocabulary 128,256, context 4096; bfloat16 compute over
float32 weights, scanned layers, remat of the projections' outputs (model.remat=dots), the loss's
logits 1,024 positions at a time; 256 sequences (1M tokens) per step as 4 micro-batches of 64.

  python launch.py --experiment=llama_1b --mode=compile --topology=v5e-64

Expected (jax 0.10.2, libtpu 0.0.42.1; the README's compile table has the figures): 4.1 GiB per
v5e chip of 16 with one sequence per chip, 1.03x the analytic floor.
"""

from research.config import default_config


def get_config():
  c = default_config()
  c.tokenizer.update(kind='sentencepiece', vocab_size=128256)
  c.model.update(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, ffn='swiglu',
                 ffn_multiplier=4.0, norm='rmsnorm', pos_encoding='rope', rope_base=500000.0,
                 tie_embeddings=True, max_len=4096, dtype='bfloat16', param_dtype='float32',
                 scan_layers=True, remat='dots')
  c.train.update(steps=100_000, batch_size=256, grad_accum_steps=4, seq_len=4096,
                 loss_chunk=256, learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.1,
                 weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, log_every=10,
                 eval_every=1000, eval_batches=4, checkpoint_every=500)
  c.mesh.update(data=1, fsdp=-1)
  c.sampling.update(prompt='The ', max_new_tokens=100)
  return c
