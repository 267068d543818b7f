"""`ModelConfig`: the architecture, one field per `model.*` config key."""

import dataclasses

from research.errors import UserError

CHOICES = {
    'family': ('decoder',),
    'pos_encoding': ('learned', 'sinusoidal', 'rope'),
    'norm': ('layernorm', 'rmsnorm'),
    'norm_position': ('pre', 'post'),
    'ffn': ('relu', 'gelu', 'swiglu'),
    'dtype': ('float32', 'bfloat16'),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters. `vocab_size` comes from the tokenizer, the rest from `model.*`.

  family: 'decoder' (GPT).
  pos_encoding: 'learned' (GPT-2), 'sinusoidal' (Vaswani et al. 2017) or 'rope' (Su et al. 2021).
  num_kv_heads: key/value heads; 0 means num_heads (MHA), 1 is MQA (Shazeer 2019), else GQA
    (Ainslie et al. 2023).
  norm: 'layernorm' (Ba et al. 2016) or 'rmsnorm' (Zhang & Sennrich 2019); norm_position 'pre'
    (GPT-2) or 'post' (the original Transformer).
  ffn: 'relu' (original), 'gelu' (GPT/BERT, tanh approximation) or 'swiglu' (Shazeer 2020);
    hidden width = ffn_multiplier * d_model.
  dtype: compute dtype; parameters, softmax and loss stay float32.
  """
  vocab_size: int
  family: str = 'decoder'
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0
  d_model: int = 256
  ffn_multiplier: float = 4.0
  max_len: int = 256
  dropout: float = 0.0
  pos_encoding: str = 'learned'
  rope_base: float = 10000.0
  norm: str = 'layernorm'
  norm_position: str = 'pre'
  ffn: str = 'gelu'
  tie_embeddings: bool = True
  dtype: str = 'float32'

  def __post_init__(self):
    for key, allowed in CHOICES.items():
      if getattr(self, key) not in allowed:
        raise UserError(f'model.{key}={getattr(self, key)!r} is not one of {allowed}; '
                        f'set --config.model.{key} to one of them.')
    for key in ('vocab_size', 'num_layers', 'num_heads', 'd_model', 'max_len'):
      if getattr(self, key) < 1:
        raise UserError(f'model.{key}={getattr(self, key)} must be >= 1.')
    if self.d_model % self.num_heads:
      raise UserError(f'model.d_model={self.d_model} is not divisible by model.num_heads='
                      f'{self.num_heads}; pick num_heads that divides d_model.')
    if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
      raise UserError(f'model.num_kv_heads={self.num_kv_heads} must divide model.num_heads='
                      f'{self.num_heads} (0 means num_heads).')
    if self.pos_encoding == 'rope' and self.head_dim % 2:
      raise UserError(f'RoPE needs an even head dimension, got d_model/num_heads={self.head_dim}.')
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f'model.dropout={self.dropout} must be in [0, 1).')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def ffn_dim(self) -> int:
    return int(self.ffn_multiplier * self.d_model)
