"""llama3_8b: the Llama 3 8B architecture (Grattafiori et al. 2024) for TPU pods, compiled ahead.

32 layers, d_model 4096, 32 query heads and 8 key/value heads (GQA), SwiGLU FFN of 14336,
RMSNorm, RoPE with theta 500,000, untied embeddings, vocabulary 128,256, context 8192; bfloat16
compute over float32 weights; layers scanned, the backward pass recomputing all but the
projections' outputs (model.remat=dots; =full keeps only each block's input, 3x less HBM); the
loss's float32 logits 256 positions at a time (train.loss_chunk). The recipe: AdamW 3e-4 (betas 0.9/0.95, weight decay 0.1, clip 1.0), 2,000 warmup steps, cosine to
3e-5; 512 sequences (4.2M tokens) per step as 8 micro-batches of 64, FSDP over every device.

  python launch.py --experiment=llama3_8b --mode=compile --topology=v5p-128
  python launch.py --experiment=llama3_8b --mode=compile --topology=v5p-128 \\
      --config.mesh.fsdp=16 --config.mesh.tensor=4 --config.train.grad_accum_steps=32

v5p-128 is Cloud TPU's name for 64 chips (the number counts TensorCores). Expected (jax 0.10.2,
libtpu 0.0.42.1; the README's compile table has the figures): with one sequence per chip per
micro-batch, 27.3 GiB per chip of 95 with fsdp=64 and 12.9 GiB with fsdp=16 x tensor=4, within
1.07x of the analytic floor (with model.remat=full: 9.3 and 6.7 GiB, 2.0x and 1.5x: one layer's
backward at 8,192 tokens is not in the floor); the 32 scanned layers compile in ~35 s on 2 CPU cores
(unrolled: ~4.5 minutes).
"""

from research.config import default_config


def get_config():
  c = default_config()
  c.tokenizer.update(kind='sentencepiece', vocab_size=128256)
  c.model.update(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, ffn='swiglu',
                 ffn_multiplier=3.5, norm='rmsnorm', pos_encoding='rope', rope_base=500000.0,
                 tie_embeddings=False, max_len=8192, dtype='bfloat16', param_dtype='float32',
                 scan_layers=True, remat='dots')
  c.train.update(steps=500_000, batch_size=512, grad_accum_steps=8, seq_len=8192,
                 loss_chunk=256, learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.1,
                 weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, log_every=10,
                 eval_every=1000, eval_batches=4, checkpoint_every=500)
  c.mesh.update(data=1, fsdp=-1)
  c.sampling.update(prompt='The ', max_new_tokens=100)
  return c
