"""gpt2_124m: GPT-2 small (Radford et al. 2019) with nanoGPT's recipe, for GPUs and TPU slices.

12 layers, 12 heads, d_model 768, context 1024, vocabulary 50304 (GPT-2's 50257 padded to a
multiple of 64), learned positions, pre-LayerNorm, GELU, tied embeddings, no dropout; AdamW
(6e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0), 2,000 warmup steps and cosine decay to 6e-5
over 600k steps; 512 sequences (524k tokens) per step as 4 micro-batches of 128; bfloat16 compute
over float32 weights; FSDP over every device.

Compile it for a TPU slice on any host (libtpu: pip install -r requirements-tpu.txt):

  python launch.py --experiment=gpt2_124m --mode=compile --topology=v5e-16

Expected (jax 0.10.2, libtpu 0.0.42.1): fits, 5.2 GiB per v5e chip of 16 (4 micro-batches of 8
sequences per chip), 1.12x the analytic floor; with --count_flops, FLOPs per chip (2.44e13 a step)
and temporaries (5.1 GiB) as the same step's with --config.mesh.data=16 --config.mesh.fsdp=1 (checked by
tests/test_compile.py, slow; the README's compile table has the figures).

To train, give it a corpus and a tokenizer of that size (a SentencePiece BPE of 50,304 pieces
trains on the data's train split; the embedded default corpus is too small for it):

  python launch.py --experiment=gpt2_124m --config.data.path=/data/owt --workdir=runs/gpt2
"""

from research.config import default_config


def get_config():
  c = default_config()
  c.tokenizer.update(kind='sentencepiece', vocab_size=50304)
  c.model.update(num_layers=12, num_heads=12, d_model=768, max_len=1024, ffn='gelu',
                 norm='layernorm', pos_encoding='learned', tie_embeddings=True,
                 dtype='bfloat16', param_dtype='float32', scan_layers=True, remat='dots')
  c.train.update(steps=600_000, batch_size=512, grad_accum_steps=4, seq_len=1024,
                 learning_rate=6e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1,
                 b1=0.9, b2=0.95, grad_clip=1.0, log_every=10, eval_every=1000, eval_batches=20,
                 checkpoint_every=1000)
  c.mesh.update(data=1, fsdp=-1)
  c.sampling.update(prompt='The ', max_new_tokens=100)
  return c
